"""End-to-end helpers: run the real CLI under mpirun / horovodrun as a subprocess, with a timeout."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HVDTRAIN = os.path.join(ROOT, "bin", "hvdtrain")
BIN = os.path.dirname(sys.executable)


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1",
             PATH=f"{BIN}:{e.get('PATH', '')}", HVDHYBRID_PYTHON=sys.executable)
    e.pop("HVDHYBRID_INJECT_FAILURE", None)
    return e


@dataclass
class Result:
    rc: int
    out: str
    err: str
    seconds: float


def run(cmd: list[str], timeout: float = 240, extra_env: Optional[dict[str, str]] = None) -> Result:
    import time

    e = env()
    e.update(extra_env or {})
    t0 = time.monotonic()
    p = subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)
    return Result(p.returncode, p.stdout, p.stderr, time.monotonic() - t0)


def mpirun(np_: int, *args: str, hostfile: Optional[str] = None, **kw: object) -> Result:
    cmd = ["mpirun", "-np", str(np_), "--oversubscribe", "-x", "HVDHYBRID_PYTHON", "-x", "OMP_NUM_THREADS"]
    if "extra_env" in kw:
        for k in kw["extra_env"]:  # type: ignore[union-attr]
            cmd += ["-x", k]
    if hostfile:
        cmd += ["--hostfile", hostfile]
    return run(cmd + [HVDTRAIN, *args], **kw)  # type: ignore[arg-type]


def horovodrun(np_: int, *args: str, gloo: bool = False, **kw: object) -> Result:
    cmd = ["horovodrun", "-np", str(np_), "-H", f"localhost:{np_}"] + (["--gloo"] if gloo else [])
    return run(cmd + [HVDTRAIN, *args], **kw)  # type: ignore[arg-type]


def params(out: str) -> dict[str, torch.Tensor]:
    """The final parameters a run wrote with --save-params."""
    return torch.load(os.path.join(out, "params.pt"))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def assert_planned(np_: int, args: list[str], out: str, activations: Optional[float] = 0.1) -> None:
    """`hvdtrain plan -np N ARGS` predicted the run's memory.json: parameters, gradients and optimizer
    state exactly, saved activations within ``activations`` of the measured (None: only that some are
    predicted, for a model whose activations depend on which rows a batch holds)."""
    import json

    r = run([HVDTRAIN, "plan", "-np", str(np_), "--json", *args])
    assert r.rc == 0, r.err[-3000:]
    pred = {rank: pos for pos in json.loads(r.out[r.out.index("{"):])["positions"] for rank in pos["ranks"]}
    for m in json.load(open(os.path.join(out, "memory.json"))):
        p = pred[m["rank"]]
        assert [p[k] for k in ("parameters", "gradients", "optimizer")] == \
            [m[k] for k in ("parameters", "gradients", "optimizer")], (m, p)
        if activations is None:
            assert p["activations_peak"] > 0, (m, p)
        else:
            off = abs(p["activations_peak"] - m["activations_peak"])
            assert off <= activations * m["activations_peak"], (m, p)
