"""The session without MPI: `agreed` against a fake communicator, and options into the config tree."""

from __future__ import annotations

from typing import Any, Optional

import pytest

from hvdhybrid.comm.agreement import agreed
from hvdhybrid.errors import UserError
from hvdhybrid.training.data import DataError


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


VALUES: dict[str, Any] = dict(
    stages=None, bundle_shape=None, stages_per_rank=1, placement="looped",
    microbatches=2, schedule="gpipe", fp16_compression=False, accumulate=2,
    steps=7, batch_size=48, lr=0.1, seed=3, out="runs/x", device="cpu", partition="params",
    threads=0, save_params=False, progress=False, checkpoint_every=5, keep=2, resume=False,
    timeout=9.0, clip_grad=1.5, warmup=2, lr_schedule="cosine")


def test_the_command_line_carries_every_option_into_the_config_tree() -> None:
    """Was: Common.train_config copied CLI options into TrainConfig by hand. Now the options are made
    from the tree's fields, so every option the command line offers lands in its section."""
    import click
    from click.testing import CliRunner

    from hvdhybrid.cli.options import config_options
    from hvdhybrid.config import Config, check_batch, option_fields
    from hvdhybrid.layout.topology import Layout

    got: list[Config] = []

    @click.command()
    @config_options(collective=False)
    def cmd(cfg: Config) -> None:
        got.append(cfg)

    args: list[str] = []
    for name, value in VALUES.items():
        flag = "--" + name.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            args.append(flag if value else ("--no-" + flag[2:] if name in ("fp16_compression", "progress")
                                            else ""))
        else:
            args += [flag, str(value)]
    res = CliRunner().invoke(cmd, [a for a in args if a])
    assert res.exit_code == 0, res.output
    cfg = got[0]
    fields = option_fields()
    shared = {n for n, (_, f) in fields.items() if f.metadata["cli"]}
    assert shared >= set(VALUES), sorted(set(VALUES) - shared)
    for name in VALUES:
        section = fields[name][0]
        assert getattr(getattr(cfg, section), name) == VALUES[name], name
    assert cfg.run.model_name == "model" and cfg.pipeline.slices is None  # resolved later, by the run
    assert check_batch(cfg, Layout(1, (1,))) == 24
    resolved = cfg.resolved(model_name="mlp", out="elsewhere")
    assert resolved.run.model_name == "mlp" and cfg.run.out == "runs/x"  # a new tree; the old unchanged


def test_epochs_count_whole_batches_of_the_training_rows() -> None:
    from hvdhybrid.cli.session import steps_for_epochs
    from hvdhybrid.training.data import DataError

    assert steps_for_epochs(3, 100, 32) == 9  # the sampler drops the partial last batch
    with pytest.raises(DataError, match="--epochs must be >= 1"):
        steps_for_epochs(0, 100, 32)
    with pytest.raises(DataError, match="larger than the 10 training rows"):
        steps_for_epochs(1, 10, 32)
