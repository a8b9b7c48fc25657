"""Property: any `hvdtrain plan` input either prints a layout or fails with one line and exit 2."""

from __future__ import annotations

from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from hvdhybrid.cli.main import cli
from hvdhybrid.layout.rows import BatchError, check_batch
from hvdhybrid.layout.topology import Layout, LayoutError

shapes = st.one_of(
    st.text(alphabet="0123456789,- x", max_size=12),
    st.lists(st.integers(-2, 9), min_size=0, max_size=5).map(lambda xs: ",".join(map(str, xs))),
)


@settings(max_examples=150, deadline=None)
@given(np_=st.integers(-3, 300), shape=shapes, stages=st.one_of(st.none(), st.integers(-2, 20)))
def test_plan_parses_or_fails_cleanly(np_: int, shape: str, stages: int | None) -> None:
    args = ["plan", "-np", str(np_), "--bundle-shape", shape]
    if stages is not None:
        args += ["--stages", str(stages)]
    r = CliRunner().invoke(cli, args)
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    if r.exit_code == 0:
        assert "bundle groups:" in r.output
    else:
        assert r.exit_code == 2
        out = r.output
        assert "Traceback" not in out
        assert out.startswith("hvdtrain: error:") or "Error:" in out


@settings(max_examples=300, deadline=None)
@given(batch=st.integers(-5, 5000), world=st.integers(1, 64),
       widths=st.lists(st.integers(1, 4), min_size=1, max_size=4), micro=st.integers(-1, 16))
def test_batch_and_layout_raise_only_their_documented_errors(batch: int, world: int, widths: list[int],
                                                            micro: int) -> None:
    try:
        layout = Layout(world, tuple(widths))
        rows = check_batch(batch, layout.num_bundles, micro, layout.widths)
    except (LayoutError, BatchError):
        return
    for w in widths:
        assert rows % w == 0 and rows * layout.num_bundles * micro == batch
