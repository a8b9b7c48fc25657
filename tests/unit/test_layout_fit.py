"""hvdtrain plan --fit: the largest world a command's layout rule fits, else the smallest change that fits."""

from __future__ import annotations

import pytest

from hvdhybrid.cli.layout_fit import apply_changes, describe_changes, largest_fit
from hvdhybrid.config import Config, ParallelConfig
from hvdhybrid.layout.topology import LayoutError


def _fit(slots: int, strict: bool = False, widths: tuple[int, ...] | None = None, **parallel: object) -> dict:
    cfg = Config(parallel=ParallelConfig(**parallel))  # type: ignore[arg-type]
    return largest_fit("gpt2", cfg, slots, (1,), widths, tensor_parallel=True, strict=strict)


def test_the_rule_kept_while_it_fits_with_fewer_bundles() -> None:
    got = _fit(6, stages=2, tensor=2)
    assert (got["np"], got["bundles"], got["tensor"], got["changes"]) == (4, 1, 2, {})


def test_the_smallest_change_when_the_rule_fits_nothing() -> None:
    got = _fit(3, stages=2, tensor=2)  # a bundle needs 4: one option lowered, the most ranks
    assert got["np"] == 2 and len(got["changes"]) == 1
    assert got["changes"] in ({"--tensor": "1"}, {"--stages": "1"})
    got = _fit(2, stages=3, tensor=4)  # lowering one option is not enough (3 x 2 or 1 x 4 > 2): both
    assert got["np"] == 2 and set(got["changes"]) == {"--tensor", "--stages"}
    assert _fit(1, stages=2)["changes"] == {"--stages": "1"}


def test_a_bundle_shape_becomes_stages_one_rank_wide_before_fewer_stages() -> None:
    got = _fit(2, bundle_shape="2,1")
    assert got["changes"] == {"--stages": "2", "--bundle-shape": None} and got["widths"] == [1, 1]


def test_strict_refuses_and_a_model_s_own_widths_are_not_changed() -> None:
    with pytest.raises(LayoutError, match="fits in 3 rank"):
        _fit(3, strict=True, stages=2, tensor=2)
    with pytest.raises(LayoutError, match="no smaller --tensor or --stages fits either"):
        _fit(1, widths=(1, 1))  # GROVER's task parallel: the model makes the widths


def test_changes_apply_to_a_command_line_in_either_spelling() -> None:
    args = ["gpt2", "--tensor", "2", "--bundle-shape=2,1", "--steps", "3"]
    changes = {"--tensor": "1", "--stages": "2", "--bundle-shape": None}
    assert apply_changes(args, changes) == ["gpt2", "--steps", "3", "--tensor", "1", "--stages", "2"]
    assert describe_changes(changes) == "--tensor 1, --stages 2, --bundle-shape dropped"
    assert apply_changes(args, {}) == args


def test_a_changed_layout_keeps_the_recomputed_stages_in_range() -> None:
    from hvdhybrid.config import PipelineConfig

    def fit(recompute: str) -> dict:
        cfg = Config(parallel=ParallelConfig(stages=3), pipeline=PipelineConfig(recompute=recompute))
        return largest_fit("gpt2", cfg, 2, (1,), None, tensor_parallel=True)
    assert fit("full:1")["changes"] == {"--stages": "2"}
    with pytest.raises(LayoutError, match="no smaller --tensor or --stages fits either"):
        fit("full:2")  # stage 2 of fewer stages does not exist: no change fits


def test_a_rule_that_fits_no_world_is_refused_not_changed() -> None:
    from hvdhybrid.config import OptimConfig, PipelineConfig

    cfg = Config(parallel=ParallelConfig(stages=2), pipeline=PipelineConfig(microbatches=2),
                 optim=OptimConfig(batch_size=3))  # 3 rows never split into 2 microbatches
    with pytest.raises(LayoutError) as e:
        largest_fit("gpt2", cfg, 2, (1,), None, tensor_parallel=True)
    assert "no smaller" not in str(e.value)
