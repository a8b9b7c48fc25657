"""Saved activations do not outlive their step: the accounting's peak after 3 steps equals the peak after
1, for the schedules that keep a graph for a split W (zb1) and the recomputation modes that hold a
function with the graph. Two leaks this catches, both found by the planner's accuracy bench: the counting
hook held a saved output as itself (a cycle through its grad_fn; every zb1 step leaked), and gpt's and
gpt2's attention core closed over a tensor reassigned to the block's output (a cycle through the graph
under --recompute selective)."""

from __future__ import annotations

import json
import os

import pytest
from conftest import HVDTRAIN, run

CASES = {
    "mlp-zb1": ["mlp", "--hidden", "64", "--batch-size", "16", "--stages-per-rank", "2", "-m", "2"],
    "gpt2-zb1-selective": ["gpt2", "--size", "tiny", "--seq-len", "32", "--batch-size", "4", "--limit", "64",
                           "--sample-tokens", "0", "-m", "2", "--recompute", "selective"],
    "gpt-zb1-selective": ["gpt", "--config", "tiny", "--seq-len", "48", "--limit", "200", "--batch-size", "4",
                          "-m", "2", "--recompute", "selective"],
    "gpt2-zb1-full": ["gpt2", "--size", "tiny", "--seq-len", "32", "--batch-size", "4", "--limit", "64",
                      "--sample-tokens", "0", "-m", "2", "--recompute", "full"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_activations_peak_does_not_grow_with_the_steps(tmp_path, case: str) -> None:
    peaks = []
    for steps in (1, 3):
        out = str(tmp_path / str(steps))
        r = run([HVDTRAIN, *CASES[case], "--schedule", "zb1", "--steps", str(steps), "--no-progress",
                 "--out", out])
        assert r.rc == 0, r.err[-3000:]
        peaks.append([m["activations_peak"] for m in json.load(open(os.path.join(out, "memory.json")))])
    assert peaks[0] == peaks[1] and peaks[0][0] > 0, peaks
