"""``--trace FILE``: a Chrome trace with one track per rank holding the schedule's actions."""

from __future__ import annotations

import json
import os

from conftest import mpirun


def test_trace_has_every_ranks_actions_in_schedule_order(tmp_path) -> None:
    path = str(tmp_path / "trace.json")
    r = mpirun(4, "mlp", "--stages", "2", "--steps", "2", "--microbatches", "3", "--schedule", "gpipe",
               "--batch-size", "24", "--no-progress", "--trace", path, "--out", str(tmp_path / "run"))
    assert r.rc == 0, r.err[-3000:]
    ev = json.load(open(path))["traceEvents"]
    tracks = {e["pid"]: e["args"]["name"] for e in ev if e["name"] == "process_name"}
    assert sorted(tracks) == [0, 1, 2, 3] and "stage 1" in tracks[1]
    for rank in range(4):
        acts = [e["name"] for e in sorted((e for e in ev if e["ph"] == "X" and e["pid"] == rank),
                                          key=lambda e: e["ts"]) if e["cat"] in "FBW"]
        s = tracks[rank].split("stage ")[1][0]
        one = [f"{s}F{m}" for m in range(3)] + [f"{s}B{m}" for m in range(3)]
        assert acts == one * 2, (rank, acts)
    spans = [e for e in ev if e["ph"] == "X"]
    assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in spans)
    assert {e["cat"] for e in spans} >= {"F", "B", "sync", "optimizer"}


def test_trace_into_a_missing_directory_is_refused(tmp_path) -> None:
    out = str(tmp_path / "run")
    r = mpirun(2, "mlp", "--steps", "1", "--trace", str(tmp_path / "no" / "t.json"), "--out", out)
    assert r.rc == 2 and "--trace" in r.err and "directory does not exist" in r.err
    assert not os.path.exists(out)
