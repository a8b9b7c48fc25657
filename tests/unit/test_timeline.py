"""The text timelines of hvdhybrid.pipeline.timeline."""

from __future__ import annotations

from hvdhybrid.layout.placement import Placement
from hvdhybrid.parallel.graph import StageGraph
from hvdhybrid.pipeline.schedules import build
from hvdhybrid.pipeline.timeline import draw, peak_held


def test_draw_shows_rows_bubble_and_peaks() -> None:
    g = StageGraph.chain(2)
    text = draw(g, Placement.identity(2), build("1f1b", g, 4), 4)
    assert text.splitlines()[0] == "position 0: 0F0 0F1   . 0B0 0F2 0B1 0F3 0B2   . 0B3"
    assert "10 ticks (unit costs); bubble 4/20 = 20.0%" in text
    assert text.endswith("position 0 2, position 1 1")


def test_peak_held_counts_to_w_when_split() -> None:
    g = StageGraph.chain(2)
    plan = build("zb1", g, 4)
    assert peak_held(plan[1]) >= peak_held(build("1f1b", g, 4)[1])
    assert peak_held([]) == 0
