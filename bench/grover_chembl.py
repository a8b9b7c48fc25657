"""GROVER on CHEMBL2321810 (scaffold split): from scratch, after pretraining, and a random forest.

    .venv/bin/python bench/grover_chembl.py [--pretrained DIR] [--seeds 0,1,2] [--ranks 2]
                                            [--pretrain-steps 3000] [--out runs/grover-chembl]

1. pretrains GROVER (config small, task parallel on --ranks ranks) on RDKit's shipped
   molecules, unless --pretrained names a finished `hvdtrain grover pretrain` run;
2. finetunes on CHEMBL2321810's pIC50 values (scaffold split 0.8/0.1/0.1, split seed 0)
   from scratch and from the pretrained encoder, each with and without --rdkit-2d, once per
   seed (the seed sets the initial weights and the batch order);
3. runs the random forest on Morgan fingerprints on the same split, once per seed;
4. prints a Markdown table of validation and test RMSE (pIC50 units), mean and standard
   deviation over the seeds, and writes every run's numbers to OUT/results.json.

Every command it runs is printed first, so each number can be reproduced by hand.
It took 33 minutes on 2 cores (15 of them pretraining). Nothing here judges.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
HVDTRAIN = os.path.join(ROOT, "bin", "hvdtrain")


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1",
                OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_mpi_yield_when_idle="1",
                HVDHYBRID_PYTHON=sys.executable,
                PATH=f"{os.path.dirname(sys.executable)}:{os.environ.get('PATH', '')}")


def _run(cmd: list[str]) -> str:
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    t0 = time.monotonic()
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)
    if p.returncode:
        print(p.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}")
    print(f"  ({time.monotonic() - t0:.0f} s)", file=sys.stderr, flush=True)
    return p.stdout


def fresh_out(path: str) -> None:
    """Make the results directory; an existing one is refused (nothing is overwritten)."""
    if os.path.exists(path):
        raise SystemExit(f"{path} exists; pass another --out (nothing is overwritten)")
    os.makedirs(path)


def _mpirun(ranks: int, *args: str) -> list[str]:
    return ["mpirun", "-np", str(ranks), "--oversubscribe", "-x", "HVDHYBRID_PYTHON", "-x", "OMP_NUM_THREADS",
            HVDTRAIN, *args]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pretrained", help="a finished `hvdtrain grover pretrain` run (default: pretrain now)")
    ap.add_argument("--pretrain-steps", type=int, default=3000)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--ranks", type=int, default=2, help="ranks per run (task parallel needs 2 per bundle)")
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "grover-chembl"))
    a = ap.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    fresh_out(a.out)
    pre = a.pretrained
    if pre is None:
        pre = os.path.join(a.out, "pretrain")
        _run(_mpirun(a.ranks, "grover", "pretrain", "--task-parallel", "--steps", str(a.pretrain_steps),
                     "--no-progress", "--out", pre))
    rows: dict[str, list[dict[str, float]]] = {}
    for seed in seeds:
        for name, extra in [("GROVER small, from scratch", []),
                            ("GROVER small, from scratch, + RDKit 2D", ["--rdkit-2d"]),
                            ("GROVER small, pretrained", ["--checkpoint", pre]),
                            ("GROVER small, pretrained, + RDKit 2D", ["--checkpoint", pre, "--rdkit-2d"])]:
            tag = name.replace(" ", "").replace(",", "-").replace("+", "")
            out = os.path.join(a.out, f"{tag}-seed{seed}")
            _run(_mpirun(a.ranks, "grover", "finetune", "--task-parallel", "--seed", str(seed),
                         "--no-progress", *extra, "--out", out))
            with open(os.path.join(out, "summary.json")) as f:
                s = json.load(f)
            rows.setdefault(name, []).append(
                {"seed": seed, "val_rmse": s["val_rmse"], "test_rmse": s["test_rmse"]})
        res = json.loads(_run([HVDTRAIN, "grover", "baseline", "--seed", str(seed)]).strip().splitlines()[-1])
        rows.setdefault("random forest, Morgan r=2 2048 bits, 500 trees", []).append(
            {"seed": seed, "val_rmse": res["val_rmse"], "test_rmse": res["test_rmse"]})
        rows.setdefault("no model: the training set's mean pIC50", []).append(
            {"seed": seed, "val_rmse": res["train_mean_val_rmse"], "test_rmse": res["train_mean_test_rmse"]})
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump({"pretrained": pre, "seeds": seeds, "runs": rows}, f, indent=2)

    def stat(xs: list[float]) -> str:
        return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"
    print(f"\n| model | val RMSE | test RMSE | test RMSE per seed ({', '.join(map(str, seeds))}) |")
    print("|---|---|---|---|")
    for name, rs in rows.items():
        print(f"| {name} | {stat([r['val_rmse'] for r in rs])} | {stat([r['test_rmse'] for r in rs])} | "
              f"{', '.join(format(r['test_rmse'], '.3f') for r in rs)} |")


if __name__ == "__main__":
    main()
