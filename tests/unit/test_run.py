"""hvdhybrid.cli.session without MPI: `agreed` against a fake communicator, and `Common.train_config`."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Optional

import pytest

from hvdhybrid.cli.session import Common, agreed
from hvdhybrid.errors import UserError
from hvdhybrid.training.data import DataError
from hvdhybrid.training.trainer import TrainConfig


class FakeComm:
    """One rank's view of a world whose other ranks report ``others`` (None: succeeded)."""

    def __init__(self, rank: int, others: list[Optional[str]]) -> None:
        self.rank, self.others, self.gathered = rank, others, 0

    def Get_rank(self) -> int:
        return self.rank

    def Get_size(self) -> int:
        return len(self.others)

    def allgather(self, x: Any) -> list[Any]:
        self.gathered += 1
        return [x if r == self.rank else e for r, e in enumerate(self.others)]


def test_success_everywhere_keeps_the_names_bound_in_the_block() -> None:
    comm = FakeComm(0, [None, None])
    with agreed(comm):
        value = 42
    assert value == 42 and comm.gathered == 1


def test_the_only_failing_rank_speaks_and_names_itself() -> None:
    with pytest.raises(UserError, match=r"^bad --steps \(on rank 1\)$"):
        with agreed(FakeComm(1, [None, None, None])):
            raise DataError("bad --steps")


def test_a_failure_on_every_rank_is_not_suffixed() -> None:
    with pytest.raises(UserError, match=r"^bad --steps$"):
        with agreed(FakeComm(0, [None, "bad --steps"])):
            raise DataError("bad --steps")
    with pytest.raises(UserError, match=r"^one rank alone$"):
        with agreed(FakeComm(0, [None])):
            raise DataError("one rank alone")


def test_other_ranks_exit_quietly_with_code_2() -> None:
    with pytest.raises(SystemExit) as ok_rank:
        with agreed(FakeComm(0, [None, "rank 1 failed"])):
            pass
    assert ok_rank.value.code == 2
    with pytest.raises(SystemExit) as later_failure:  # only the first failing rank speaks
        with agreed(FakeComm(2, [None, "rank 1 failed", None])):
            raise DataError("rank 2 failed too")
    assert later_failure.value.code == 2


def test_other_exceptions_pass_through_without_the_collective() -> None:
    comm = FakeComm(0, [None, None])
    with pytest.raises(RuntimeError, match="a bug"):
        with agreed(comm):
            raise RuntimeError("a bug")
    assert comm.gathered == 0


def common(**kw: Any) -> Common:
    base: dict[str, Any] = dict(
        stages=None, bundle_shape=None, stages_per_rank=1, placement="looped",
        microbatches=2, schedule="gpipe", fp16=False, accumulate=2,
        steps=7, batch_size=48, lr=0.1, seed=3, out="runs/x", device="cpu", partition="params",
        threads=0, save_params=False, progress=False, checkpoint_every=5, keep=2, resume=False,
        timeout=9.0, clip_grad=1.5, warmup=2, lr_schedule="cosine")
    base.update(kw)
    return Common(**base)


def test_train_config_carries_every_option_it_shares_with_trainconfig() -> None:
    c = common()
    cfg = c.train_config("mlp")
    assert cfg.model_name == "mlp"
    assert cfg.out is None  # set once the ranks agree on the directory
    shared = ({f.name for f in fields(TrainConfig)} & {f.name for f in fields(Common)}) - {"out"}
    assert shared, "Common and TrainConfig should share option names"
    for name in shared:
        assert getattr(cfg, name) == getattr(c, name), name
    assert cfg.validate(1, (1,)) == 24


def test_epochs_count_whole_batches_of_the_training_rows() -> None:
    from hvdhybrid.cli.session import steps_for_epochs
    from hvdhybrid.training.data import DataError

    assert steps_for_epochs(3, 100, 32) == 9  # the sampler drops the partial last batch
    with pytest.raises(DataError, match="--epochs must be >= 1"):
        steps_for_epochs(0, 100, 32)
    with pytest.raises(DataError, match="larger than the 10 training rows"):
        steps_for_epochs(1, 10, 32)
