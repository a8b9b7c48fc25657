"""hvdtrain launch --elastic's loop without MPI: jobs and the layout fit are stand-ins."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from hvdhybrid.cli.elastic import Elastic, ElasticError, ElasticOptions, lost_hosts, out_dir
from hvdhybrid.cli.launcher import Supervision

KILLED_H1 = ("mpirun noticed that process rank 2 with PID 0 on node h1 exited on signal 9 (Killed).\n")
LOST_DAEMON = ("ORTE has lost communication with a remote daemon.\n\n  HNP daemon   : [[1234,0],0] on node "
               "launcher\n  Remote daemon: [[1234,0],2] on node h1\n")


def test_open_mpi_s_messages_name_the_lost_host() -> None:
    assert lost_hosts(KILLED_H1) == {"h1"}
    assert lost_hosts(LOST_DAEMON) == {"h1"}  # not the launch node, which reported it
    assert lost_hosts("Peer host:  h3\n") == {"h3"}
    assert lost_hosts("Traceback ... ValueError") == set()


def test_the_job_s_out_is_found_in_either_spelling() -> None:
    assert out_dir(["mlp", "--out", "runs/a"]) == "runs/a"
    assert out_dir(["mlp", "--out=runs/b", "--steps", "3"]) == "runs/b"
    assert out_dir(["mlp"]) is None


def _fit(args: list[str], slots: int) -> dict[str, Any]:
    np_ = slots // 2 * 2  # bundles of 2 ranks
    return {"np": np_, "widths": [1, 1], "tensor": 1, "layout": f"{np_ // 2} bundle(s) x stages of width 1,1"}


class Jobs:
    """Stand-in for one supervised job per call: each result in turn; a checkpoint step written before."""

    def __init__(self, out: str, results: list[tuple[Supervision, int]]) -> None:
        self.out, self.results, self.calls = out, results, []

    def __call__(self, hosts: Any, got: dict[str, Any], resume: Any) -> Supervision:
        self.calls.append((sorted(h.name for h in hosts), got["np"], resume))
        ran, step = self.results.pop(0)
        d = os.path.join(self.out, "checkpoints", f"step-{step:06d}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "manifest.json"), "w") as f:
            json.dump({"format": 2, "step": step, "model": "mlp", "world_size": got["np"], "widths": [1, 1],
                       "shards": {}}, f)
        with open(os.path.join(self.out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, "loss": 1.0}) + "\n")
        return ran


def _elastic(tmp_path: Any, results: list[tuple[Supervision, int]], **kw: Any) -> tuple[Elastic, Jobs]:
    hostfile = tmp_path / "hosts"
    hostfile.write_text("h0 slots=2\nh1 slots=2\n")
    out = str(tmp_path / "run")
    e = Elastic(ElasticOptions(4, ["mlp", "--out", out], str(hostfile), **kw), fit=_fit, say=lambda t: None)
    jobs = Jobs(out, results)
    e.once = jobs  # type: ignore[method-assign]
    return e, jobs


def _events(out: str) -> list[dict[str, Any]]:
    return [x for x in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if "event" in x]


def test_a_lost_host_is_left_out_and_the_job_resumes_smaller(tmp_path: Any) -> None:
    e, jobs = _elastic(tmp_path, [(Supervision(137, [KILLED_H1]), 4), (Supervision(0), 9)])
    assert e.run() == 0
    assert jobs.calls == [(["h0", "h1"], 4, None), (["h0"], 2, 4)]
    kinds = [(x["event"], x.get("np"), x.get("lost_hosts")) for x in _events(e.out)]
    assert kinds == [("launch", 4, None), ("failure", None, ["h1"]), ("launch", 2, None), ("done", 2, None)]


def test_a_failure_with_no_step_won_stops_instead_of_looping(tmp_path: Any) -> None:
    bad = Supervision(1, ["Traceback: ValueError\n"], why="rank 1 failed")
    e, jobs = _elastic(tmp_path, [(bad, 3), (bad, 3), (Supervision(0), 9)])
    assert e.run() == 1
    assert len(jobs.calls) == 2  # the same hosts twice (nothing named as lost), then the stop
    assert [x["event"] for x in _events(e.out)] == ["launch", "failure", "launch", "failure"]


def test_max_restarts_bounds_the_relaunches(tmp_path: Any) -> None:
    bad = Supervision(1, ["boom\n"])
    e, jobs = _elastic(tmp_path, [(bad, s) for s in range(1, 10)], max_restarts=2)
    assert e.run() == 1
    assert len(jobs.calls) == 3


def test_a_grow_request_relaunches_at_once_and_a_person_s_stop_ends_it(tmp_path: Any) -> None:
    e, jobs = _elastic(tmp_path, [(Supervision(143, grow=True), 5), (Supervision(143, user_stop=True), 6)])
    assert e.run() == 143
    assert [c[2] for c in jobs.calls] == [None, 5]
    assert [x["event"] for x in _events(e.out)] == ["launch", "grow", "launch"]


def test_an_elastic_launch_needs_the_job_s_out(tmp_path: Any) -> None:
    with pytest.raises(ElasticError, match="--elastic needs the job's --out"):
        Elastic(ElasticOptions(4, ["mlp"], "hosts"))


def test_a_job_grows_only_after_a_checkpoint_of_its_own(tmp_path: Any) -> None:
    e, _ = _elastic(tmp_path, [])
    ckpts = os.path.join(e.out, "checkpoints")
    assert not e.could_grow(2, None)  # no checkpoint yet: still starting
    os.makedirs(os.path.join(ckpts, "step-000007"))
    with open(os.path.join(ckpts, "step-000007", "manifest.json"), "w") as f:
        f.write("{}")
    assert not e.could_grow(2, 7)  # the one it resumed from
    assert e.could_grow(2, 6)  # one it wrote: 4 slots fit 2 bundles
    assert not e.could_grow(4, 6)  # already as large as the hosts allow


def test_when_the_rule_fits_no_world_left_the_change_is_announced_and_recorded(tmp_path: Any) -> None:
    said: list[str] = []

    def fit(args: list[str], slots: int) -> dict[str, Any]:  # tensor 2 x 2 stages: 4 ranks a bundle
        if slots >= 4:
            return {"np": 4, "widths": [1, 1], "tensor": 2, "layout": "1 bundle(s) x tensor 2", "changes": {}}
        return {"np": 2, "widths": [1, 1], "tensor": 1, "layout": "1 bundle(s)", "changes": {"--tensor": "1"}}

    e, jobs = _elastic(tmp_path, [(Supervision(137, [KILLED_H1]), 4), (Supervision(0), 9)])
    e.fit_world, e.say = fit, said.append
    assert e.run() == 0
    launches = [x for x in _events(e.out) if x["event"] == "launch"]
    assert [x["changes"] for x in launches] == [{}, {"--tensor": "1"}]
    assert any("so changed: --tensor 1" in s for s in said)
