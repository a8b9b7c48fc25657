"""Activation recomputation: keep a region's inputs in the forward, recompute the region in the backward.

Modes (``--recompute MODE[:S0,S1,..]``, per model stage):

    none        every activation a backward needs is kept
    full        a stage keeps only its inputs per microbatch, and, where it is a chain of layers
                (a sequential model's layers; GPT's, GPT-2's and BERT's embeddings, blocks and
                head), each layer's input; its forward runs again in its backward, a layer at a
                time (:func:`full`): what the recomputation holds at once is one layer's
                activations, not the stage's. The dropout masks are kept, 1 bit per element,
                and replayed (:class:`~hvdhybrid.parallel.dropout.MaskTape`), not redrawn
    selective   the attention core of GPT, GPT-2 and BERT (scores, softmax, dropout, the product with
                V) is recomputed; it holds the largest activations (heads x tokens x tokens per row)

Pure up to :func:`recomputed` (the config tree parses ``--recompute`` with :class:`Recompute`).
Keyed randomness makes the recomputed dropout masks the same ones: a mask is a
function of (seed, step, rows, name) (:mod:`randomness`), and the rows are set
per microbatch forward, so the recomputation restores the rows current at the
forward it repeats (both modes keep the forward's masks and replay them, which is
cheaper than drawing them again; the restored keys serve any other keyed draw).
Built on torch's non-reentrant checkpoint, which also works when a backward runs
split (zero-bubble schedules' B and W).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

from ..errors import InputError

__all__ = ["MODES", "RecomputeError", "Recompute", "attention", "full", "recomputed", "selective", "taped"]

MODES = ("none", "full", "selective")


class RecomputeError(InputError):
    """A ``--recompute`` value that does not fit the model (one line, naming the fix)."""


@dataclass(frozen=True)
class Recompute:
    """``--recompute``: a mode, and the model stages it applies to (None: every stage)."""

    mode: str = "none"
    stages: Optional[tuple[int, ...]] = None

    @classmethod
    def parse(cls, text: str) -> "Recompute":
        mode, _, rest = text.partition(":")
        if mode not in MODES:
            raise RecomputeError(f"--recompute {text!r}: the mode must be one of {', '.join(MODES)} "
                                 "(optionally with :STAGE,STAGE.., e.g. full:0,1)")
        if not rest:
            return cls(mode)
        try:
            stages = tuple(sorted({int(s) for s in rest.split(",")}))
        except ValueError:
            raise RecomputeError(f"--recompute {text!r}: stages must be numbers, e.g. {mode}:0,1") from None
        if mode == "none":
            raise RecomputeError(f"--recompute {text!r}: none takes no stages; drop ':{rest}'")
        return cls(mode, stages)

    def mode_of(self, stage: int) -> str:
        return self.mode if self.stages is None or stage in self.stages else "none"

    def check(self, num_stages: int, selective_ok: bool, model: str, sliced: bool = False) -> None:
        """Raises RecomputeError: a stage out of range, ``selective`` for a model without attention,
        ``full`` with token slices (a second forward would extend their key/value cache again)."""
        bad = [s for s in self.stages or () if not 0 <= s < num_stages]
        if bad:
            raise RecomputeError(f"--recompute {self.mode}:{','.join(map(str, self.stages or ()))}: stage(s) "
                                 f"{bad} out of range; the model has stages 0..{num_stages - 1}")
        if self.mode == "selective" and not selective_ok:
            raise RecomputeError(f"--recompute selective recomputes attention, and {model} has none; use "
                                 "--recompute full")
        if self.mode == "full" and sliced:
            raise RecomputeError("--recompute full runs a stage's forward again, which would extend the "
                                 "token slices' key/value cache twice; use --recompute selective with "
                                 "--slices")


_SELECTIVE = {"on": False}


@contextlib.contextmanager
def selective(on: bool) -> Iterator[None]:
    """Within: :func:`attention` recomputes (the executor sets it per stage forward)."""
    before = _SELECTIVE["on"]
    _SELECTIVE["on"] = on
    try:
        yield
    finally:
        _SELECTIVE["on"] = before


def recomputed(fn: Callable[..., Any], *args: Any, tape: Optional[Any] = None) -> Any:
    """``fn(*args)``, its activations dropped after the forward and recomputed in the backward, under
    the keyed-randomness rows and step of now. With a :class:`~hvdhybrid.parallel.dropout.MaskTape`,
    the dropout masks of the forward are kept and reused, not redrawn."""
    from torch.utils.checkpoint import checkpoint

    from . import randomness

    snap = randomness.snapshot()

    def contexts() -> tuple[Any, Any]:
        if tape is None:
            return contextlib.nullcontext(), _Restored(snap)
        return tape.recording(), _Both(_Restored(snap), tape.replaying())
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True, context_fn=contexts)


def full(module: Any, *args: Any) -> Any:
    """``--recompute full`` of a stage: ``module(*args)`` recomputed in the backward, a layer at a time
    where the module is a chain of layers (``module.pieces()``: callables ``x -> x`` applied in order,
    each layer's input kept), else as one region (its inputs kept)."""
    pieces = getattr(module, "pieces", None)
    chain = pieces() if callable(pieces) else None
    if not chain or len(args) != 1:
        return taped(module, *args)
    x = args[0]
    for k, piece in enumerate(chain):
        given, seen = x, _versions(x)
        if isinstance(x, tuple):  # each tensor an input of its own: kept (and counted) as saved
            x = taped(lambda *a, f=piece: f(tuple(a)), *x)
        else:
            x = taped(piece, x)
        if _versions(given) != seen:
            raise RecomputeError(f"--recompute full: layer {k} of the stage changes its input in place, "
                                 "which its recomputation would see changed; make it out of place (e.g. "
                                 "inplace=False), or use --recompute none or selective")
    return x


def _versions(x: Any) -> tuple[Optional[int], ...]:
    """The version counters of ``x``'s tensors (an in-place change bumps them)."""
    import torch

    return tuple(t._version if torch.is_tensor(t) else None for t in (x if isinstance(x, tuple) else (x,)))


class _Restored:
    """The keys of ``snap`` within; re-enterable (a split backward, B then W, recomputes twice)."""

    def __init__(self, snap: Any) -> None:
        self.snap = snap
        self.stack: list[Any] = []

    def __enter__(self) -> None:
        from . import randomness

        cm = randomness.restored(self.snap)
        cm.__enter__()
        self.stack.append(cm)

    def __exit__(self, *exc: Any) -> None:
        self.stack.pop().__exit__(*exc)


class _Both:
    """Two re-enterable contexts as one."""

    def __init__(self, a: Any, b: Any) -> None:
        self.a, self.b = a, b

    def __enter__(self) -> None:
        self.a.__enter__()
        self.b.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.b.__exit__(*exc)
        self.a.__exit__(*exc)


def attention(core: Callable[..., Any], *args: Any) -> Any:
    """A model's attention core: recomputed under ``selective`` (its dropout masks kept, 1 bit per
    element, and counted as saved), else run as it is."""
    if not _SELECTIVE["on"]:
        return core(*args)
    return taped(core, *args)


def taped(fn: Callable[..., Any], *args: Any) -> Any:
    """:func:`recomputed` with a :class:`~hvdhybrid.parallel.dropout.MaskTape`: the forward's dropout
    masks are kept (packed) and replayed, not redrawn, and held by the output's autograd node, so the
    saved-tensor hooks count them with the activations."""
    import torch

    from .dropout import MaskTape

    tape = MaskTape()
    out = recomputed(fn, *args, tape=tape)
    if not tape.masks or not torch.is_grad_enabled():
        return out
    if not isinstance(out, tuple):
        return _keep_masks().apply(out, *tape.masks) if out.requires_grad else out
    at = next((i for i, t in enumerate(out) if torch.is_tensor(t) and t.requires_grad), None)
    if at is None:
        return out
    return out[:at] + (_keep_masks().apply(out[at], *tape.masks),) + out[at + 1:]


@functools.lru_cache(maxsize=None)
def _keep_masks() -> Any:
    """The autograd Function, made at first use (torch is imported lazily here)."""
    import torch

    class KeepMasks(torch.autograd.Function):
        """Identity on ``out`` that saves the tape's masks: the saved-tensor hooks count them with the
        activations (the tape holds them for the recomputation)."""

        @staticmethod
        def forward(ctx: Any, out: Any, *masks: Any) -> Any:
            ctx.save_for_backward(*masks)
            return out.view_as(out)

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            return (grad,) + (None,) * len(ctx.saved_tensors)
    return KeepMasks
