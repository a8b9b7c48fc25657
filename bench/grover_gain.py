"""Does pretraining pay? GROVER finetuned from scratch, from the 15k-molecule encoder and from MOSES.

    .venv/bin/python bench/grover_gain.py [--moses-steps 15000] [--rdkit-steps 3000] [--seeds 0,1,2]
        [--moses DIR] [--rdkit DIR] [--out runs/grover-gain]

1. pretrains GROVER small (2 bundles, streamed, --workers auto) on MOSES for --moses-steps
   steps of 32 and on RDKit's 15k shipped molecules for --rdkit-steps, unless --moses / --rdkit
   name finished `hvdtrain grover pretrain` runs;
2. finetunes each on CHEMBL2321810 (pIC50 regression, RMSE) and on B3DB (blood-brain barrier,
   classification, ROC-AUC), scaffold split 0.8/0.1/0.1 with split seed 0, from scratch and from
   each encoder, once per seed (the seed sets the heads' initial weights and the batch order);
3. prints, per data set, test and validation metric as mean ± standard deviation over the seeds,
   and writes every run's numbers to OUT/results.json.

Every command is printed before it runs. Nothing here judges.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from grover_chembl import HVDTRAIN, ROOT, _mpirun, _run, fresh_out

# (data set, its finetune options, metric, finetuning steps)
SETS = [("CHEMBL2321810", ["--data", "chembl2321810"], "rmse", 300),
        ("B3DB", ["--data", "b3db", "--task", "classification"], "roc_auc", 600)]


def pretrain(out: str, corpus: str, steps: int) -> str:
    t0 = time.monotonic()
    _run(_mpirun(2, "grover", "pretrain", "--corpus", corpus, "--steps", str(steps),
                 "--checkpoint-every", "1000", "--no-progress", "--out", out))
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    print(f"pretrained on {corpus}: {steps} steps in {time.monotonic() - t0:.0f} s, "
          f"{s['samples_per_s']:.0f} molecules/s, final loss {s['final_loss']:.2f}, "
          f"validation loss {s['val_loss']:.2f}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--moses", help="a finished pretraining run on MOSES (default: pretrain now)")
    ap.add_argument("--rdkit", help="a finished pretraining run on the shipped molecules (default: now)")
    ap.add_argument("--moses-steps", type=int, default=15000)
    ap.add_argument("--rdkit-steps", type=int, default=3000)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "grover-gain"))
    a = ap.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    fresh_out(a.out)
    rdkit = a.rdkit or pretrain(os.path.join(a.out, "pretrain-rdkit"), "rdkit", a.rdkit_steps)
    moses = a.moses or pretrain(os.path.join(a.out, "pretrain-moses"), "moses", a.moses_steps)
    starts = [("from scratch", []), ("pretrained on RDKit's 15k", ["--checkpoint", rdkit]),
              ("pretrained on MOSES", ["--checkpoint", moses])]
    runs: dict[str, dict[str, list[dict[str, float]]]] = {}
    for data, opts, metric, steps in SETS:
        for seed in seeds:
            for name, extra in starts:
                out = os.path.join(a.out, f"{data}-{name.split()[-1]}-seed{seed}".replace("'", ""))
                _run(_mpirun(2, "grover", "finetune", *opts, "--seed", str(seed), "--steps", str(steps),
                             "--no-progress", *extra, "--out", out))
                with open(os.path.join(out, "summary.json")) as f:
                    s = json.load(f)
                runs.setdefault(data, {}).setdefault(name, []).append(
                    {"seed": seed, "val": s[f"val_{metric}"], "test": s[f"test_{metric}"]})
                with open(os.path.join(a.out, "results.json"), "w") as f:
                    json.dump({"moses": moses, "rdkit": rdkit, "seeds": seeds, "runs": runs}, f, indent=2)

    def stat(xs: list[float]) -> str:
        return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"
    for data, _, metric, steps in SETS:
        better = "lower" if metric == "rmse" else "higher"
        print(f"\n{data} ({metric.upper()}, {better} is better; {steps} finetuning steps of 32)\n")
        print(f"| encoder | val {metric} | test {metric} | test per seed ({', '.join(map(str, seeds))}) |")
        print("|---|---|---|---|")
        for name, rs in runs[data].items():
            print(f"| {name} | {stat([r['val'] for r in rs])} | {stat([r['test'] for r in rs])} | "
                  f"{', '.join(format(r['test'], '.3f') for r in rs)} |")
    print(f"\n`{HVDTRAIN}` runs in {a.out}")


if __name__ == "__main__":
    main()
