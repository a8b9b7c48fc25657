"""Gradient synchronisation and the gradient guard, each reading every parameter's ownership tag.

Once per optimizer step, after every microbatch of every accumulation pass:

1. *rows*: the replicas of a row group average their gradients (mpi4py Allreduce);
2. *ties*: a parameter held by several stage groups sums its gradients over
   the tied communicator (each holder has the part of its own stage);
3. *data*: bundles average over the data group (Horovod grouped allreduce,
   fp16 on the wire when asked).

Then :meth:`GradSync.guard` computes the whole model's gradient norm as one
process would (each parameter counted once: replicated copies weighted down,
shards added, a tie counted on its first stage), skips a non-finite step and
clips to ``clip`` by global norm.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from ..comm.groups import ProcessGroups
from ..layout.placement import Placement
from ..parallel.ownership import Tied, owner_of, shard_of

__all__ = ["GradSync", "WorldSum"]

WorldSum = Callable[[list[float], str], list[float]]


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors]) if tensors else torch.zeros(0)


def _unflat(flat: torch.Tensor, like: list[torch.Tensor]) -> None:
    off = 0
    for t in like:
        n = t.numel()
        t.copy_(flat[off:off + n].view_as(t))
        off += n


def _allreduce(comm: Any, tensors: list[torch.Tensor], divide: int = 1) -> None:
    """Sum ``tensors`` over ``comm`` in one buffer call (it releases the GIL); divide by ``divide``."""
    from mpi4py import MPI

    flat = _flat(tensors).to(torch.float64 if tensors[0].dtype == torch.float64 else torch.float32)
    arr = flat.cpu().numpy()
    comm.Allreduce(MPI.IN_PLACE, arr, op=MPI.SUM)
    out = torch.from_numpy(arr).to(tensors[0].device)
    if divide > 1:
        out.div_(divide)
    _unflat(out, tensors)


class GradSync:
    """Averages (and sums, for ties) one rank's gradients; guards and clips the global norm.

    Args:
        groups: this rank's process groups (with the tied communicators the
            model needs already added).
        placement: which stage group runs each stage (to find a tie's groups).
        modules: this rank's stage modules, ``stage -> module``.
        fp16: send gradients across bundles as float16 (:class:`~hvdhybrid.comm.fp16_allreduce.Fp16Allreduce`:
            cast into reused buffers, bucketed, overlapped with communication).
    """

    def __init__(self, groups: ProcessGroups, placement: Placement, modules: dict[int, nn.Module],
                 fp16_compression: bool = True) -> None:
        self.groups, self.placement = groups, placement
        self.fp16_compression = fp16_compression  # float16 on the wire across bundles (not --precision)
        self.stages = sorted(modules)
        seen: set[int] = set()
        self.params: list[nn.Parameter] = []
        for s in self.stages:
            for p in modules[s].parameters():
                if p.requires_grad and id(p) not in seen:  # a tie on one rank is one object
                    seen.add(id(p))
                    self.params.append(p)
        # tied parameters whose holders are on other ranks, by stage-group set, in an order
        # every holder agrees on (fixed for the run: computed once, not every step)
        by: dict[tuple[int, ...], list[nn.Parameter]] = {}
        for p in self.params:
            owner = owner_of(p)
            if isinstance(owner, Tied) and len(placement.groups_of(owner.stages)) > 1:
                by.setdefault(placement.groups_of(owner.stages), []).append(p)
        self.remote_ties = [(ps, _sorted_by_tie(ts)) for ps, ts in sorted(by.items())]
        self._fp16: Optional[Any] = None  # compression.Fp16Allreduce, made at the first sync
        #: --zero: the sharded optimizer (level 2: its chunks, summed onto their owners, replace the
        #: data-group all-reduce)
        self.zero: Optional[Any] = None
        #: --reduce overlap: the data-group average, started bucket by bucket during the backward
        self.overlap: Optional[Any] = None

    def overlap_blocker(self, zero_level: int) -> Optional[str]:
        """Why ``--reduce overlap`` cannot run here (None: it can)."""
        if self.groups.data_set is None:
            return "one bundle: nothing to average across bundles"
        if not self.early_reduce:
            return "row replicas or ties across ranks sum gradients before the average"
        if zero_level == 2:
            return "--zero 2 sends gradients to their owners instead"
        return None

    def microbatch_blocker(self, local_stages: int) -> Optional[str]:
        """Why ``--reduce microbatch`` (with ``--zero 2``) cannot run here (None: it can)."""
        if self.groups.data_set is None:
            return "one bundle: nothing to send to other bundles"
        if not self.early_reduce:
            return "row replicas or ties across ranks sum gradients before they go to their owners"
        if local_stages > 1:
            return "several stages on a rank would each send every chunk"
        return None

    @property
    def early_reduce(self) -> bool:
        """``--zero 2`` can send gradients to their owners during the backward: nothing must be summed
        over the row group or a tie first (which needs them whole)."""
        return self.groups.rows.Get_size() == 1 and not self.remote_ties

    def _grads(self) -> list[torch.Tensor]:
        for p in self.params:
            if p.grad is None:  # a parameter this rank's rows never touched still takes part
                p.grad = torch.zeros_like(p)
        return [p.grad for p in self.params if p.grad is not None]

    def sync(self) -> None:
        """Average every gradient over its row group, sum ties, then average over the data group."""
        if not self.params:
            return
        if self.zero is not None and self.zero.level == 2 and self.early_reduce:
            self.zero.reduce_rest()  # chunks went during the backward; each member keeps its share only
            return
        if self.overlap is not None:  # buckets went during the backward: wait for them
            self.overlap.finish()
            return
        grads = self._grads()
        width = self.groups.rows.Get_size()
        if width > 1:
            _allreduce(self.groups.rows, grads, divide=width)
        for ps, ts in self.remote_ties:
            _allreduce(self.groups.tied[ps], [t.grad for t in ts if t.grad is not None])
        if self.groups.data_set is not None:
            from ..comm import horovod_ops

            c = self.groups.coord
            name = f"grads.s{c.stage}.r{c.replica}.t{c.tensor}"
            if self.zero is not None and self.zero.level == 2:  # each member keeps its share only
                self.zero.reduce_rest()
                return
            if self.fp16_compression:  # cast once into reused buffers, bucketed, overlapped with the wire
                if self._fp16 is None:
                    from ..comm.fp16_allreduce import Fp16Allreduce

                    self._fp16 = Fp16Allreduce(self.groups.data_set, name)
                self._fp16(grads)
                return
            reduced = horovod_ops.allreduce_average(grads, self.groups.data_set, name=name)
            for g, r in zip(grads, reduced):
                g.copy_(r)

    def average_statistics(self, tensors: list[torch.Tensor]) -> None:
        """Average running statistics (BatchNorm's mean and variance) over the row group and the data
        group, so every copy of a stage holds one value (each copy saw only its own rows)."""
        if not tensors:
            return
        width = self.groups.rows.Get_size()
        if width > 1:
            _allreduce(self.groups.rows, tensors, divide=width)
        if self.groups.data_set is not None:
            from ..comm import horovod_ops

            c = self.groups.coord
            reduced = horovod_ops.allreduce_average(tensors, self.groups.data_set,
                                                    name=f"stats.s{c.stage}.r{c.replica}.t{c.tensor}")
            for t, r in zip(tensors, reduced):
                t.copy_(r)

    def norm_share(self) -> float:
        """This rank's share of the squared global norm: the world sum of shares is the norm^2.

        After :meth:`sync`, every copy of a parameter holds the same gradient:
        row replicas and bundles divide their square by their count, tensor
        ranks too unless the parameter is sharded, and a tie counts only on
        the rank holding its first stage.
        """
        total = 0.0
        for p in self.params:
            if p.grad is not None:
                total += _square_sum(p.grad) * self.weight_of(p) / self.groups.layout.num_bundles
        if self.zero is not None:  # level 2: a share of the data group's average, counted once there
            total += self.zero.norm_share()
        return total

    def weight_of(self, p: nn.Parameter) -> float:
        """How much one bundle's copy of ``p`` counts in the squared norm: 1 over its copies in a
        bundle (row replicas, and tensor ranks unless sharded); 0 for a tie off its first stage."""
        lay, c = self.groups.layout, self.groups.coord
        owner = owner_of(p)
        if isinstance(owner, Tied) and owner.first not in self.stages:
            return 0.0
        return 1.0 / (lay.widths[c.stage] * (lay.tensor if shard_of(owner) is None else 1))

    def grad_tensors(self) -> list[torch.Tensor]:
        """Every gradient this rank holds now (with --zero 2, after the sync: its share)."""
        out = [p.grad for p in self.params if p.grad is not None]
        if self.zero is not None and self.zero.part.grad is not None:
            out.append(self.zero.part.grad)
        return out

    def guard(self, clip: float, world_sum: WorldSum) -> tuple[bool, float]:
        """Collective: the global gradient norm; skip a non-finite step, clip a large one.

        A non-finite norm (float16 compression overflows beyond 65504) skips the
        optimizer step on every rank, as a mixed-precision loss scaler does.

        Returns:
            (step allowed, global norm).
        """
        total = world_sum([self.norm_share()], "the gradient-norm allreduce of every rank")[0]
        if not math.isfinite(total):
            return False, total
        norm = math.sqrt(total)
        if clip > 0 and norm > clip:
            coef = clip / (norm + 1e-6)  # as torch.nn.utils.clip_grad_norm_
            for g in self.grad_tensors():
                g.mul_(coef)
        return True, norm

    def broadcast_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Collective: every copy's optimizer state becomes bundle 0's (row replica 0's).

        Called after a resume (at the start the state is empty: it is made by
        the first step from gradients that are already equal everywhere).
        """
        self._from_bundle0(_state_tensors(optimizer, self.params), "optim")

    def broadcast_parameters(self, modules: dict[int, nn.Module]) -> None:
        """Make every copy start equal: row replica 0 of bundle 0, and a tie's first stage
        (the value one process keeps for it), wherever that stage is placed."""
        tensors = [t for s in self.stages for t in list(modules[s].parameters()) + list(modules[s].buffers())]
        self._from_bundle0([t.data for t in {id(t): t for t in tensors}.values()], "params")
        for ps, ts in self.remote_ties:
            for t in ts:
                first = owner_of(t).first  # type: ignore[union-attr]
                _bcast(self.groups.tied[ps], [t.data], root=ps.index(self.placement.position_of(first)))

    def _from_bundle0(self, tensors: list[torch.Tensor], what: str) -> None:
        """Collective: ``tensors`` become row replica 0's, then bundle 0's (in place).

        MPI broadcasts, not Horovod's: Horovod keeps the tensors it broadcast alive (measured: the
        whole model's parameters stayed resident after ``--zero`` moved them into its flat buffer)."""
        if self.groups.rows.Get_size() > 1:
            _bcast(self.groups.rows, tensors, root=0)
        if self.groups.data_set is not None and tensors:
            _bcast(self.groups.data, tensors, root=0)  # the data group's rank is the bundle


def _bcast(comm: Any, tensors: Sequence[torch.Tensor], root: int) -> None:
    """In-place MPI broadcast of each tensor from ``root`` of ``comm`` (buffer calls, through the CPU)."""
    for t in tensors:
        arr = t.detach().cpu().contiguous()
        comm.Bcast(_np(arr), root=root)
        t.copy_(arr)


def _state_tensors(optimizer: torch.optim.Optimizer, params: Sequence[nn.Parameter]) -> list[torch.Tensor]:
    """The optimizer's state tensors of ``params``, in an order every copy agrees on."""
    out = []
    for p in params:
        st = optimizer.state.get(p, {})  # type: ignore[call-overload]
        out += [st[k] for k in sorted(st) if torch.is_tensor(st[k])]
    return out


def _square_sum(t: torch.Tensor, chunk: int = 1 << 20) -> float:
    """Sum of squares in float64, a chunk at a time (a whole float64 copy of a big layer is costly)."""
    flat = t.detach().reshape(-1)
    return sum(float(c.double().pow_(2).sum()) for c in flat.split(chunk))


def _sorted_by_tie(ps: Sequence[nn.Parameter]) -> list[nn.Parameter]:
    """Tied parameters in an order every holder agrees on: by the tie's canonical name."""
    return sorted(ps, key=lambda p: owner_of(p).name)  # type: ignore[union-attr]


def _np(t: torch.Tensor) -> Any:
    return t.reshape(-1).view(torch.uint8).numpy() if t.numel() else t.numpy()
