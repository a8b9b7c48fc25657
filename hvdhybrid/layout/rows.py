"""Pure row arithmetic: global batch -> bundle -> microbatch -> replica, and re-batching.

Every rank of a bundle computes its own rows from integers alone, so no batch
is ever sent around. Sizes must divide evenly: the loss is a mean over the
global batch and gradients are *averaged* at every level, which is exact only
when every part has the same number of rows.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError

__all__ = ["BatchError", "Piece", "check_batch", "peers", "replica_rows", "transfer_pieces"]


class BatchError(InputError):
    """A batch size that does not split evenly over bundles, microbatches and widths."""


def _lcm(a: int, b: int) -> int:
    from math import gcd
    return a * b // gcd(a, b)


def check_batch(global_batch: int, num_bundles: int, microbatches: int,
                widths: tuple[int, ...]) -> int:
    """Validate the split of a global batch; return the rows of one microbatch.

    Raises:
        BatchError: naming the sizes and the nearest batch size that works.
    """
    if microbatches < 1:
        raise BatchError(f"--microbatches must be >= 1, got {microbatches}")
    unit = num_bundles * microbatches
    for w in widths:
        unit = _lcm(unit, num_bundles * microbatches * w)
    if global_batch < 1 or global_batch % unit:
        lo = max(unit, global_batch // unit * unit)
        raise BatchError(
            f"global batch {global_batch} does not split evenly over {num_bundles} bundle(s) x "
            f"{microbatches} microbatch(es) x stage widths {list(widths)}; it must be a "
            f"multiple of {unit}: use --batch-size {lo} or {lo + unit}"
        )
    return global_batch // (num_bundles * microbatches)


def replica_rows(global_batch: int, num_bundles: int, bundle: int, microbatches: int,
                 mb: int, width: int, replica: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of the global batch that (bundle, mb, replica) works on."""
    per_bundle = global_batch // num_bundles
    per_mb = per_bundle // microbatches
    per_rep = per_mb // width
    start = bundle * per_bundle + mb * per_mb + replica * per_rep
    return start, start + per_rep


@dataclass(frozen=True)
class Piece:
    """Rows that go from one source replica to one destination replica of an edge.

    ``src_start/src_stop`` index the source replica's own rows; ``dst_start``
    says where they land in the destination replica's rows.
    """

    src_replica: int
    dst_replica: int
    src_start: int
    src_stop: int
    dst_start: int


def transfer_pieces(rows: int, src_width: int, dst_width: int) -> list[Piece]:
    """Re-batching plan for a microbatch of ``rows`` rows between two stage widths.

    Source replica ``i`` holds rows ``[i*rows/src_width, ...)``; destination
    replica ``j`` needs ``[j*rows/dst_width, ...)``. The pieces are the
    non-empty overlaps, in source order within each destination. Which replicas
    talk to which depends only on the widths, never on ``rows``.
    """
    if rows % src_width or rows % dst_width:
        raise BatchError(f"{rows} rows do not split over widths {src_width} and {dst_width}")
    a, b = rows // src_width, rows // dst_width
    out = []
    for j in range(dst_width):
        for i in range(src_width):
            lo, hi = max(i * a, j * b), min((i + 1) * a, (j + 1) * b)
            if lo < hi:
                out.append(Piece(i, j, lo - i * a, hi - i * a, lo - j * b))
    return out


def peers(src_width: int, dst_width: int) -> list[tuple[int, int]]:
    """(source replica, destination replica) pairs that exchange rows on an edge."""
    return [(p.src_replica, p.dst_replica)
            for p in transfer_pieces(src_width * dst_width, src_width, dst_width)]
