"""``hvdtrain run MODULE:FN``: any importable build function, every common option, any layout."""

from __future__ import annotations

import os

from conftest import HVDTRAIN, ROOT, mpirun, params, run

EXAMPLE = os.path.join(ROOT, "docs", "examples", "build_fn.py")
ARGS = ["--steps", "6", "--no-progress", "--save-params", "--no-fp16-compression", "-m", "2",
        "--arg", "hidden=24"]



def test_build_fn_file_at_4_ranks_matches_one_rank(tmp_path) -> None:
    one, four = str(tmp_path / "one"), str(tmp_path / "four")
    r = run([HVDTRAIN, "run", f"{EXAMPLE}:build", *ARGS, "--out", one])
    assert r.rc == 0, r.err[-3000:]
    r = mpirun(4, "run", f"{EXAMPLE}:build", *ARGS, "--stages", "2", "--out", four)
    assert r.rc == 0, r.err[-3000:]
    a, b = params(one), params(four)
    assert a.keys() == b.keys() and a["0.0.weight"].shape == (24, 20)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5


def test_build_fn_from_a_module_on_pythonpath(tmp_path) -> None:
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "train.py").write_text(open(EXAMPLE).read())
    out = str(tmp_path / "mod")
    r = mpirun(2, "run", "mypkg.train:build", "--steps", "2", "--no-progress", "--out", out,
               extra_env={"PYTHONPATH": f"{tmp_path}:{ROOT}"})
    assert r.rc == 0, r.err[-3000:]
    assert "eval accuracy" in r.err
