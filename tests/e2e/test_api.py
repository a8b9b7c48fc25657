"""The README's own-model example runs as written, and gives one process's result at 4 ranks."""

from __future__ import annotations

import os
import re
import sys

from conftest import ROOT, run

EXAMPLE = os.path.join(ROOT, "docs", "examples", "own_loop.py")


def test_own_model_and_loop_example_matches_one_process() -> None:
    one = run([sys.executable, EXAMPLE])
    assert one.rc == 0, one.err[-3000:]
    r = run(["mpirun", "-np", "4", "--oversubscribe", "-x", "OMP_NUM_THREADS", "-x", "PYTHONPATH",
             sys.executable, EXAMPLE], extra_env={"PYTHONPATH": ROOT})
    assert r.rc == 0, r.err[-3000:]
    losses = [float(v) for v in re.findall(r"step \d+ loss ([\d.]+)", one.out)]
    assert len(losses) == 4 and losses[-1] < losses[0], one.out
    c1 = float(re.search(r"checksum ([\d.]+)", one.out).group(1))  # type: ignore[union-attr]
    c4 = float(re.search(r"checksum ([\d.]+)", r.out).group(1))  # type: ignore[union-attr]
    assert abs(c1 - c4) <= 1e-6 * c1, (c1, c4)
    losses4 = [float(v) for v in re.findall(r"step \d+ loss ([\d.]+)", r.out)]
    assert len(losses4) == 4 and all(abs(a - b) <= 2e-4 for a, b in zip(losses, losses4)), (losses, losses4)


def test_a_horovod_script_ported_to_hvdhybrid_trains_the_same_parameters() -> None:
    """docs/examples: the plain Horovod script and its port, both at 2 ranks with fp16 compression."""
    def checksum(script: str) -> float:
        r = run(["mpirun", "-np", "2", "--oversubscribe", "-x", "OMP_NUM_THREADS", "-x", "PYTHONPATH",
                 sys.executable, os.path.join(ROOT, "docs", "examples", script)],
                extra_env={"PYTHONPATH": ROOT})
        assert r.rc == 0, r.err[-3000:]
        return float(re.search(r"checksum ([\d.]+)", r.out).group(1))  # type: ignore[union-attr]

    plain, ported = checksum("horovod_script.py"), checksum("horovod_ported.py")
    assert abs(plain - ported) <= 1e-6 * plain, (plain, ported)


def test_the_oslo_style_gpt2_example_trains_saves_and_merges(tmp_path) -> None:
    """docs/examples/gpt2_tensor_data.py at tensor 2 x data 2; the merged directory loads."""
    out = str(tmp_path / "gpt2")
    r = run(["mpirun", "-np", "4", "--oversubscribe", "-x", "OMP_NUM_THREADS", "-x", "PYTHONPATH",
             sys.executable, "-m", "mpi4py", os.path.join(ROOT, "docs", "examples", "gpt2_tensor_data.py"),
             out],
            extra_env={"PYTHONPATH": ROOT})
    assert r.rc == 0, r.err[-3000:]
    assert "data 1/2, tensor 1/2, pipeline 0/1" in r.out
    losses = [float(v) for v in re.findall(r"step \d+ loss ([\d.]+)", r.out)]
    assert len(losses) == 4 and losses[-1] < losses[0], r.out
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(os.path.join(out, "merged"))
    assert model.transformer.wte.weight.shape == (256, 64)


def test_init_layout_auto_trains_the_planners_choice_as_one_process() -> None:
    """docs/examples/gpt2_auto.py: hh.init(layout="auto") plans on the launch's ranks, a stock GPT-2
    trains in the chosen layout, and ends with one process's parameters (fp16 on the wire: 1e-6)."""
    example = os.path.join(ROOT, "docs", "examples", "gpt2_auto.py")
    one = run([sys.executable, example], extra_env={"PYTHONPATH": ROOT})
    assert one.rc == 0, one.err[-3000:]
    r = run(["mpirun", "-np", "4", "--oversubscribe", "-x", "OMP_NUM_THREADS", "-x", "PYTHONPATH",
             sys.executable, "-m", "mpi4py", example], extra_env={"PYTHONPATH": ROOT})
    assert r.rc == 0, r.err[-3000:]
    assert "--layout auto chose" in r.err and re.search(r"chose tensor \d+ x pipeline \d+ x data \d+", r.out)
    c1 = float(re.search(r"checksum ([\d.]+)", one.out).group(1))  # type: ignore[union-attr]
    c4 = float(re.search(r"checksum ([\d.]+)", r.out).group(1))  # type: ignore[union-attr]
    assert abs(c1 - c4) <= 1e-6 * c1, (c1, c4)


def test_init_layout_auto_needs_a_model_command() -> None:
    code = ("import hvdhybrid as hh\nfrom hvdhybrid.config import ConfigError\n"
            "for kw in ({'layout': 'auto'}, {'layout': 'best'},"
            " {'layout': 'auto', 'command': ['mlp'], 'stages': 2}, {'max_memory': '1GB'}):\n"
            "    try:\n        hh.init(**kw)\n    except ConfigError as e:\n        print('refused:', e)\n")
    r = run([sys.executable, "-c", code], extra_env={"PYTHONPATH": ROOT})
    assert r.rc == 0, r.err[-3000:]
    lines = [x for x in r.out.splitlines() if x.startswith("refused:")]
    assert len(lines) == 4, r.out
    assert "command=" in lines[0] and "'manual'" in lines[1] and "no widths, stages or tensor" in lines[2]
    assert "layout='auto'" in lines[3]
