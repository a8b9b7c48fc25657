"""When each parameter's gradient of a step is final, told during the backward.

The executor calls :meth:`FinalGrads.final_begin` / :meth:`FinalGrads.final_end`
around each stage's last weight-gradient action of a step (the last pass of an
accumulation; ``B``, or ``W`` when the schedule splits it; slice 0 with token
slices). A parameter's gradient is final when that action has accumulated it
(a post-accumulate-grad hook), or, for a parameter several local stages share,
when the last of them has; a parameter the action never touched is final at
its ``final_end`` (its gradient stays ``None``: zeros). Used by ``--zero 2``
(chunks summed onto their owners) and ``--reduce overlap`` (buckets averaged
across bundles) to start their communication while the backward goes on.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

from torch import nn

__all__ = ["FinalGrads"]


class FinalGrads:
    """Calls ``on_final(i)`` once per step for each parameter ``i`` of ``params``, as it becomes final.

    Args:
        params: the parameters, indexed as ``on_final`` receives them.
        stages: this rank's stage -> the parameters it uses.
        on_final: told each index once per step.
        on_begin: told before the first ``on_final`` of a step.
        on_end: ``every`` only: told after each weight-gradient action, which ends a round.
        every: a round per weight-gradient action, not per step: the executor brackets every
            such action of every pass (``--reduce microbatch``), and ``on_end`` must send what
            is left and :meth:`reset`.
    """

    def __init__(self, params: Sequence[nn.Parameter], stages: dict[int, Sequence[nn.Parameter]],
                 on_final: Callable[[int], None], on_begin: Callable[[], Any] = lambda: None,
                 on_end: Callable[[], None] = lambda: None, every: bool = False) -> None:
        self.every, self.on_end = every, on_end
        index = {id(p): i for i, p in enumerate(params)}
        self.stages_of: dict[int, set[int]] = {}
        for s, ps in stages.items():
            for p in ps:
                if id(p) in index:
                    self.stages_of.setdefault(index[id(p)], set()).add(s)
        self.params_of = {s: sorted({index[id(p)] for p in ps if id(p) in index}) for s, ps in stages.items()}
        self.on_final, self.on_begin = on_final, on_begin
        self.armed: Optional[int] = None
        self.active = False
        self.left: dict[int, int] = {}
        self.told: set[int] = set()
        self.reset()
        for i, p in enumerate(params):
            p.register_post_accumulate_grad_hook(functools.partial(self._on_grad, i))

    def reset(self) -> None:
        """The step is over: the next :meth:`final_begin` starts another."""
        self.left = {i: len(s) for i, s in self.stages_of.items()}
        self.armed, self.active = None, False
        self.told = set()

    def final_begin(self, stage: int) -> None:
        if not self.active:
            self.active = True
            self.on_begin()
        self.armed = stage

    def final_end(self, stage: int) -> None:
        """After ``stage``'s last weight-gradient action: its parameters are final (those it never
        touched too, as zeros)."""
        self.armed = None
        for i in self.params_of.get(stage, []):
            self.left[i] -= 1
            if self.left[i] == 0:
                self._tell(i)
        if self.every:
            self.on_end()

    def _on_grad(self, i: int, p: nn.Parameter) -> None:
        if self.active and self.armed in self.stages_of.get(i, ()) and self.left[i] == 1:
            self._tell(i)

    def _tell(self, i: int) -> None:
        if i not in self.told:
            self.told.add(i)
            self.on_final(i)
