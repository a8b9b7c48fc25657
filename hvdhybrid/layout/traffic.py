"""Bytes per optimizer step on every link between hosts, from a layout, a rank->host map and model sizes.

Two kinds of traffic leave a rank in a step (pure arithmetic, no MPI):

- *activations*: every microbatch's output of stage ``s`` goes to stage
  ``s+1`` of the same bundle, and its gradient comes back (same bytes), one
  message per (source replica, destination replica) pair that shares rows
  and per tensor rank (each tensor rank sends its own copy of the whole rows);
- *gradients*: the row replicas of a stage group average their piece first
  (fp32), then each data group (the ranks holding the same piece of the
  model across bundles) averages it with a ring all-reduce: each member
  sends ``2 (n-1)/n`` times the piece to the next member of the ring, half
  of that with fp16 compression.

Where both ends of a message are on one host it stays in shared memory;
:func:`link_bytes` says which host pairs carry what.
"""

from __future__ import annotations

from dataclasses import dataclass

from .rows import transfer_pieces
from .topology import Layout

__all__ = ["ModelSizes", "link_bytes", "cross_host_bytes", "describe_links"]


@dataclass(frozen=True)
class ModelSizes:
    """What the traffic depends on: fp32 parameter bytes per stage (a stage's whole, unsharded
    size) and the activation bytes that cross each stage boundary per global batch (the whole
    batch, forward; the backward sends as many)."""

    stage_param_bytes: tuple[float, ...]
    boundary_activation_bytes: float
    fp16_gradients: bool = True

    @classmethod
    def even(cls, param_bytes: float, stages: int, activation_bytes: float,
             fp16_compression: bool = True) -> ModelSizes:
        """Parameters split evenly over ``stages``."""
        return cls(tuple([param_bytes / stages] * stages), activation_bytes, fp16_compression)


def link_bytes(layout: Layout, hosts: list[str], sizes: ModelSizes) -> dict[tuple[str, str], float]:
    """``(host a, host b) -> bytes`` per step (a <= b; ``a == b``: within a host), both kinds of traffic.

    Raises:
        ValueError: when ``hosts`` does not name one host per rank, or the sizes one per stage.
    """
    if len(hosts) != layout.world_size:
        raise ValueError(f"{len(hosts)} hosts for {layout.world_size} ranks")
    if len(sizes.stage_param_bytes) != layout.num_stages:
        raise ValueError(f"sizes for {len(sizes.stage_param_bytes)} stages, layout has {layout.num_stages}")
    out: dict[tuple[str, str], float] = {}

    def add(r1: int, r2: int, nbytes: float) -> None:
        a, b = sorted((hosts[r1], hosts[r2]))
        out[(a, b)] = out.get((a, b), 0.0) + nbytes

    per_bundle = sizes.boundary_activation_bytes / layout.num_bundles
    for bundle in range(layout.num_bundles):
        for s in range(layout.num_stages - 1):
            w_up, w_down = layout.widths[s], layout.widths[s + 1]
            rows = w_up * w_down  # any common multiple: the pieces' shares do not depend on it
            for p in transfer_pieces(rows, w_up, w_down):
                share = (p.src_stop - p.src_start) / rows  # of the bundle's rows
                for t in range(layout.tensor):
                    src = layout.rank_of(bundle, s, p.src_replica, t)
                    dst = layout.rank_of(bundle, s + 1, p.dst_replica, t)
                    add(src, dst, 2 * per_bundle * share)  # forward activations + backward gradients
    def ring(members: list[int], nbytes: float) -> None:  # each sends 2 (n-1)/n of it to the next
        n = len(members)
        for i, r in enumerate(members if n > 1 else []):
            add(r, members[(i + 1) % n], nbytes * 2 * (n - 1) / n)

    scale = 0.5 if sizes.fp16_gradients else 1.0
    for s in range(layout.num_stages):
        piece = sizes.stage_param_bytes[s] / layout.tensor  # a tensor rank's shard
        for bundle in range(layout.num_bundles):  # a stage group's row replicas average first, in fp32
            for t in range(layout.tensor):
                ring(layout.row_members(bundle, s, t), piece)
        for q in range(layout.widths[s]):
            for t in range(layout.tensor):
                ring(layout.data_members(s, q, t), scale * piece)
    return out


def cross_host_bytes(links: dict[tuple[str, str], float]) -> float:
    """Bytes per step that cross the network (between different hosts)."""
    return sum(v for (a, b), v in links.items() if a != b)


def describe_links(links: dict[tuple[str, str], float]) -> list[str]:
    """One line per host pair, network links first, e.g. ``h0 <-> h1: 12.5 MB/step (network)``."""
    rows = sorted(links.items(), key=lambda kv: (kv[0][0] == kv[0][1], kv[0]))
    return [f"{a} <-> {b}: {v / 1e6:.3g} MB/step ({'network' if a != b else 'within the host'})"
            if a != b else f"{a}: {v / 1e6:.3g} MB/step (within the host)" for (a, b), v in rows]
