"""Every bad input: one line, exit code 2, no traceback from any rank, nothing overwritten.

Also a table generator for docs/bad-inputs.md, from the same list of cases:

    .venv/bin/python tests/e2e/test_bad_inputs.py > /tmp/table.md
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from typing import Callable, Optional

import pytest
from conftest import HVDTRAIN, ROOT, Result, horovodrun, mpirun, run

MLP = ["mlp", "--steps", "2", "--batch-size", "32", "--no-progress"]


def snapshot(path: str) -> dict[str, str]:
    out = {}
    for d, _, files in os.walk(path):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, path)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def prior_run(base: str) -> str:
    """A finished 2-rank, 2-stage mlp run with checkpoints, made once per session."""
    out = os.path.join(base, "prior")
    if not os.path.exists(os.path.join(out, "checkpoints", "latest")):
        r = mpirun(2, *MLP, "--stages", "2", "--out", out, "--checkpoint-every", "1")
        assert r.rc == 0, r.err[-2000:]
    return out


def corrupt_copy(base: str) -> str:
    src, dst = prior_run(base), os.path.join(base, "corrupt")
    if not os.path.exists(dst):
        shutil.copytree(src, dst)
        for step in os.listdir(os.path.join(dst, "checkpoints")):
            shard = os.path.join(dst, "checkpoints", step, "stage-001.pt")
            if os.path.exists(shard):
                data = open(shard, "rb").read()
                open(shard, "wb").write(data[: len(data) // 2])  # truncated
    return dst


def raw_file(base: str, name: str, data: bytes) -> str:
    p = os.path.join(base, name)
    with open(p, "wb") as f:
        f.write(data)
    return p


def resnet18_file(base: str) -> str:
    """A torchvision-format resnet18 state dict (GroupNorm, 10 classes)."""
    import torch

    from hvdhybrid.models.resnet import torchvision_layer_fns
    from hvdhybrid.parallel.staged import Part

    p = os.path.join(base, "resnet18.pt")
    torch.save(Part([f() for f in torchvision_layer_fns("resnet18", 3, 10)], 0).state_dict(), p)
    return p


def gpt2_dir(base: str, variant: str = "") -> str:
    """A small GPT-2 directory (vocabulary 301, 32 positions), or a broken copy of it."""
    import json

    from hvdhybrid.models.gpt2.data import shakespeare
    from hvdhybrid.models.gpt2.make_dir import make_model_dir

    good = os.path.join(base, "gpt2-model")
    if not os.path.exists(good):
        make_model_dir(good, vocab=301, positions=32, text=shakespeare()[:200_000])
    if not variant:
        return good
    d = os.path.join(base, f"gpt2-{variant}")
    if not os.path.exists(d):
        shutil.copytree(good, d)
        if variant == "bare":
            os.remove(os.path.join(d, "tokenizer.json"))
        else:
            c = json.load(open(os.path.join(d, "config.json")))
            c.update({"bert": {"model_type": "bert"}, "small": {"vocab_size": 300}}[variant])
            json.dump(c, open(os.path.join(d, "config.json"), "w"))
    return d


def empty_run(base: str) -> str:
    """A run directory whose checkpoints folder holds nothing complete."""
    d = os.path.join(base, "empty-run")
    os.makedirs(os.path.join(d, "checkpoints", "step-000001"), exist_ok=True)
    return d


def bad_hostfile(base: str) -> str:
    p = os.path.join(base, "hosts")
    open(p, "w").write("# two nodes\nnode1 slots=2\nnode2:2\n")
    return p


def image_dir(base: str) -> str:
    p = os.path.join(base, "images", "cat")
    os.makedirs(p, exist_ok=True)
    open(os.path.join(p, "broken.png"), "w").write("not a png")
    return os.path.dirname(p)


def molecules(base: str, name: str, text: str) -> str:
    p = os.path.join(base, name)
    with open(p, "w") as f:
        f.write(text)
    return p


LABELLED = "id,smiles,pic50,flag,note\na,CCO,5.1,1,\nb,c1ccccc1,6.2,0,\nc,CC(=O)O,x7,2,\n"
GROVER_FT = ["grover", "finetune", "--config", "tiny", "--steps", "1", "--no-progress"]
BERT = ["bert", "--steps", "1", "--batch-size", "4", "--max-len", "8", "--no-progress"]
REVIEWS = "text,label\ngreat film,pos\ndull,neg\nfine,pos\nbad,neg\n"
GROVER_PT = ["grover", "pretrain", "--config", "tiny", "--steps", "1", "--no-progress"]

# (name, how the user gets there, what the message must say)
Case = tuple[str, Callable[[str], Result], str]
GPT = ["gpt", "--stages", "2", "--seq-len", "48", "--steps", "1", "--limit", "40"]
GPT1 = [GPT[0], *GPT[3:]]  # one process


def one(*args: str) -> Result:
    """One process: for input that does not depend on the world (files, options); the cases whose
    error depends on the layout run under mpirun, where the error must still be one line."""
    return run([HVDTRAIN, *args])


def _file(base: str, name: str, data: bytes) -> str:
    path = os.path.join(base, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


CASES: list[Case] = [
    ("world not divisible by the bundle",
     lambda b: mpirun(3, *MLP, "--bundle-shape", "2,2", "--out", f"{b}/x"),
     "world size 3 is not divisible by bundle size 4"),
    ("--stages and --bundle-shape together",
     lambda b: mpirun(2, *MLP, "--stages", "2", "--bundle-shape", "1,1", "--out", f"{b}/x"),
     "either --stages or --bundle-shape"),
    ("more stages than layers",
     lambda b: mpirun(4, *MLP, "--depth", "2", "--stages", "4", "--out", f"{b}/x"),
     "cannot split 2 layers into 4 stages"),
    ("batch that does not split evenly",
     lambda b: mpirun(2, *MLP[:-3], "--batch-size", "30", "--no-progress", "--stages", "2",
                      "--out", f"{b}/x"),
     "does not split evenly"),
    ("negative --steps",
     lambda b: run([HVDTRAIN, *MLP[:1], "--steps", "-1", "--out", f"{b}/x"]),
     "--steps must be >= 0"),
    ("--device cuda without a GPU",
     lambda b: run([HVDTRAIN, *MLP, "--device", "cuda", "--out", f"{b}/x"]),
     "no CUDA GPU is usable"),
    ("missing image folder",
     lambda b: one("resnet", "--steps", "1", "--data", f"{b}/nope", "--out", f"{b}/x"),
     "does not exist"),
    ("unreadable image",
     lambda b: run([HVDTRAIN, "resnet", "--steps", "1", "--data", image_dir(b), "--out", f"{b}/x"]),
     "cannot read image"),
    ("ResNet: an --init file that does not exist",
     lambda b: run([HVDTRAIN, "resnet", "--arch", "resnet18", "--steps", "1", "--init", f"{b}/nope.pt",
                    "--out", f"{b}/x"]),
     "--init /tmp/"),
    ("ResNet: an --init file of another architecture",
     lambda b: run([HVDTRAIN, "resnet", "--arch", "resnet50", "--steps", "1", "--init", resnet18_file(b),
                    "--out", f"{b}/x"]),
     "does not fit --arch resnet50: it lacks 99 of the model's"),
    ("ResNet: --width with a torchvision architecture",
     lambda b: run([HVDTRAIN, "resnet", "--arch", "resnet18", "--width", "8", "--steps", "1",
                    "--out", f"{b}/x"]),
     "--width sets the channels of --arch small; resnet18 has torchvision's widths: drop --width"),
    ("GPT-2: a --model directory without a tokenizer",
     lambda b: one("gpt2", "--model", gpt2_dir(b, "bare"), "--steps", "1", "--out", f"{b}/x"),
     "has no tokenizer (tokenizer.json, or vocab.json and merges.txt)"),
    ("GPT-2: a --model directory of another model type",
     lambda b: run([HVDTRAIN, "gpt2", "--model", gpt2_dir(b, "bert"), "--steps", "1", "--out", f"{b}/x"]),
     "holds a 'bert' model; hvdtrain gpt2 trains GPT-2"),
    ("GPT-2: a tokenizer larger than the embedding",
     lambda b: run([HVDTRAIN, "gpt2", "--model", gpt2_dir(b, "small"), "--steps", "1", "--out", f"{b}/x"]),
     "the tokenizer has 301 tokens but the embedding 300 rows"),
    ("GPT-2: --seq-len beyond the model's positions",
     lambda b: run([HVDTRAIN, "gpt2", "--model", gpt2_dir(b), "--seq-len", "64", "--steps", "1",
                    "--out", f"{b}/x"]),
     "--seq-len 64 is longer than the context of"),
    ("GPT-2: sample from a run with no checkpoint",
     lambda b: run([HVDTRAIN, "gpt2", "sample", empty_run(b), "--prompt", "ROMEO:"]),
     "has no complete checkpoint to sample from"),
    ("--recompute selective for a model without attention",
     lambda b: run([HVDTRAIN, *MLP, "--recompute", "selective", "--out", f"{b}/x"]),
     "--recompute selective recomputes attention, and hvdtrain mlp has none; use --recompute full"),
    ("--recompute for a stage the model does not have",
     lambda b: run([HVDTRAIN, *MLP, "--recompute", "full:0,3", "--out", f"{b}/x"]),
     "stage(s) [3] out of range; the model has stages 0..0"),
    ("--zero that is not a level",
     lambda b: run([HVDTRAIN, *MLP, "--zero", "3", "--out", f"{b}/x"]),
     "--zero 3 is unknown; choose 0, 1 or 2"),
    ("--reduce microbatch without --zero 2",
     lambda b: run([HVDTRAIN, *MLP, "--zero", "1", "--reduce", "microbatch", "--out", f"{b}/x"]),
     "--reduce microbatch sends each microbatch's gradients to their owners, which --zero 2 has"),
    ("--recompute full with token slices",
     lambda b: mpirun(2, *GPT, "--slices", "2", "--recompute", "full", "--out", f"{b}/x"),
     "would extend the token slices' key/value cache twice; use --recompute selective with --slices"),
    ("--recompute that cannot be read",
     lambda b: run([HVDTRAIN, *MLP, "--recompute", "most", "--out", f"{b}/x"]),
     "--recompute 'most': the mode must be one of none, full, selective"),
    ("hostfile with a bad line",
     lambda b: run([HVDTRAIN, "launch", "-np", "2", "--hostfile", bad_hostfile(b), "--", *MLP]),
     "hosts:3: cannot read 'node2:2'"),
    ("launch --elastic without the job's --out",
     lambda b: run([HVDTRAIN, "launch", "-np", "2", "--elastic", "--hostfile", f"{ROOT}/hostfiles/localhost",
                    "--", *MLP]),
     "--elastic needs the job's --out DIR"),
    ("launch --elastic with no hosts named",
     lambda b: run([HVDTRAIN, "launch", "-np", "2", "--elastic", "--", *MLP, "--out", f"{b}/x"]),
     "--elastic needs where the hosts come from: --hostfile FILE or --host-discovery-script CMD"),
    ("launch: an elastic option without --elastic",
     lambda b: run([HVDTRAIN, "launch", "-np", "2", "--max-restarts", "5", "--", *MLP, "--out", f"{b}/x"]),
     "--max-restarts applies with --elastic; add --elastic or drop them"),
    ("launch --elastic: a discovery command that fails",
     lambda b: run([HVDTRAIN, "launch", "-np", "2", "--elastic", "--host-discovery-script", "exit 3", "--",
                    *MLP, "--out", f"{b}/x"]),
     "the discovery command 'exit 3' failed with exit code 3"),
    ("plan --fit --keep-layout: a layout no world of -np ranks fits",
     lambda b: run([HVDTRAIN, "plan", "-np", "1", "--fit", "--keep-layout", "mlp", "--stages", "2"]),
     "no layout of hvdtrain mlp with these options fits in 1 rank(s)"),
    ("hostfile with too few slots",
     lambda b: run([HVDTRAIN, "plan", "-np", "8", "--hostfile", f"{ROOT}/hostfiles/localhost"]),
     "-np 8 needs 8 slots but the hostfile has 4"),
    ("horovodrun --gloo",
     lambda b: horovodrun(2, *MLP, "--out", f"{b}/x", gloo=True),
     "not `horovodrun --gloo`"),
    ("output directory holds another run",
     lambda b: mpirun(2, *MLP, "--stages", "2", "--out", prior_run(b)),
     "already holds a run"),
    ("--resume with nothing to resume",
     lambda b: one(*MLP, "--resume", "--out", f"{b}/x"),
     "holds no run to resume"),
    ("--resume with another model size",
     lambda b: mpirun(2, *MLP, "--hidden", "64", "--bundle-shape", "2", "--resume", "--out", prior_run(b)),
     "this model's has (64, 64): it is of another model size"),
    ("--partition time with more stages than layers",
     lambda b: mpirun(3, "mlp", "--steps", "1", "--no-progress", "--depth", "2", "--stages", "3",
                      "--partition", "time", "--out", f"{b}/x"),
     "cannot split 2 layers into 3 stages"),
    ("--tensor for a model that cannot split its tensors",
     lambda b: mpirun(2, *MLP, "--tensor", "2", "--out", f"{b}/x"),
     "hvdtrain mlp cannot split its tensors (--tensor 2)"),
    ("--tensor below 1",
     lambda b: run([HVDTRAIN, "gpt2", "--tensor", "0", "--steps", "1", "--out", f"{b}/x"]),
     "--tensor must be >= 1, got 0"),
    ("--stages-per-rank below 1",
     lambda b: mpirun(2, *MLP, "--stages", "2", "--stages-per-rank", "0", "--out", f"{b}/x"),
     "--stages-per-rank must be >= 1, got 0"),
    ("--placement that does not fit",
     lambda b: mpirun(2, *MLP, "--stages", "2", "--stages-per-rank", "2", "--placement", "0,1,2,1",
                      "--out", f"{b}/x"),
     "--placement"),
    ("--resume with another model",
     lambda b: mpirun(2, "resnet", "--steps", "2", "--stages", "2", "--resume", "--out",
                      prior_run(b)),
     "the checkpoint is of model 'mlp'"),
    ("--resume when every checkpoint is truncated",
     lambda b: mpirun(2, *MLP, "--stages", "2", "--resume", "--out", corrupt_copy(b)),
     "no complete checkpoint"),
    ("GROVER: an empty SMILES file",
     lambda b: one(*GROVER_PT, "--data", molecules(b, "empty.csv", "\n"), "--out", f"{b}/x"),
     "empty.csv: the file is empty"),
    ("GROVER: a file of random bytes",
     lambda b: one(*GROVER_FT, "--data", raw_file(b, "blob.csv", bytes(range(256)) * 64),
                      "--label-cols", "y", "--out", f"{b}/x"),
     "blob.csv: is not a text file"),
    ("GROVER: a file that is not UTF-8",
     lambda b: run([HVDTRAIN, *GROVER_FT, "--data", raw_file(b, "latin.csv", b"smiles,y\nCCO,1\n\xe9CC,2\n"),
                    "--label-cols", "y", "--out", f"{b}/x"]),
     "latin.csv:3: is not UTF-8 text"),
    ("GROVER: a corpus of random bytes",
     lambda b: one(*GROVER_PT, "--corpus", raw_file(b, "blob.csv", bytes(range(256)) * 64),
                   "--out", f"{b}/x"),
     "blob.csv: is not a text file"),
    ("GROVER: a --corpus that does not exist",
     lambda b: mpirun(2, *GROVER_PT, "--corpus", f"{b}/nope.smi", "--out", f"{b}/x"),
     "nope.smi: no such file; pass moses, rdkit, or the path of a CSV or .smi file"),
    ("GROVER: --corpus and --data together",
     lambda b: one(*GROVER_PT, "--corpus", "rdkit", "--data", molecules(b, "m.smi", "CCO\n"),
                   "--out", f"{b}/x"),
     "--corpus and --data both name the corpus: give one"),
    ("GROVER: --workers that is not a number",
     lambda b: one(*GROVER_PT, "--workers", "many", "--out", f"{b}/x"),
     "--workers 'many': give a number of processes or auto"),
    ("GROVER: --freeze-encoder without a pretrained encoder",
     lambda b: one(*GROVER_FT, "--freeze-encoder", "--out", f"{b}/x"),
     "--freeze-encoder keeps a pretrained encoder as it is: give --checkpoint too"),
    ("GROVER: B3DB as a regression",
     lambda b: one(*GROVER_FT, "--data", "b3db", "--out", f"{b}/x"),
     "--data b3db holds 0/1 labels (BBB+ is 1): use --task classification"),
    ("GROVER: no SMILES parses",
     lambda b: run([HVDTRAIN, *GROVER_PT, "--data", molecules(b, "junk.smi", "C1CC(\nxyz\n"),
                    "--out", f"{b}/x"]),
     "junk.smi: none of its SMILES could be parsed"),
    ("GROVER: a missing label column",
     lambda b: one(*GROVER_FT, "--data", molecules(b, "lab.csv", LABELLED), "--label-cols", "pIC50",
                      "--out", f"{b}/x"),
     "lab.csv:1: no label column 'pIC50'; the columns are 'id', 'smiles', 'pic50', 'flag', 'note'"),
    ("GROVER: a label that is not a number",
     lambda b: run([HVDTRAIN, *GROVER_FT, "--data", molecules(b, "lab.csv", LABELLED), "--label-cols",
                    "pic50", "--out", f"{b}/x"]),
     "lab.csv:4: column 3 ('pic50') holds 'x7', not a number"),
    ("GROVER: an unlabelled data set",
     lambda b: run([HVDTRAIN, *GROVER_FT, "--data", molecules(b, "lab.csv", LABELLED), "--label-cols",
                    "note", "--out", f"{b}/x"]),
     "lab.csv: label column 'note' is empty in every row"),
    ("GROVER: a classification label other than 0/1",
     lambda b: run([HVDTRAIN, *GROVER_FT, "--data", molecules(b, "lab.csv", LABELLED), "--label-cols",
                    "flag", "--task", "classification", "--out", f"{b}/x"]),
     "lab.csv:4: column 'flag' holds 2; classification labels are 0 or 1"),
    ("GROVER: --data without --label-cols",
     lambda b: run([HVDTRAIN, *GROVER_FT, "--data", molecules(b, "lab.csv", LABELLED), "--out", f"{b}/x"]),
     "--data needs --label-cols"),
    ("GROVER: --checkpoint that is not a pretraining run",
     lambda b: one(*GROVER_FT, "--checkpoint", prior_run(b), "--out", f"{b}/x"),
     "holds no grover.pt"),
    ("GROVER: more pipeline stages than layers",
     lambda b: mpirun(4, *GROVER_FT, "--stages", "4", "--out", f"{b}/x"),
     "cannot split 2 GTransformer layers per view into 4 stages"),
    ("BERT: a missing CSV",
     lambda b: one(*BERT, "--data", f"{b}/nope.csv", "--out", f"{b}/x"),
     "nope.csv: no such file"),
    ("BERT: a file of random bytes",
     lambda b: one(*BERT, "--data", raw_file(b, "blob.csv", bytes(range(256)) * 64), "--out", f"{b}/x"),
     "blob.csv: is not a text file"),
    ("BERT: a missing text column",
     lambda b: run([HVDTRAIN, *BERT, "--data", molecules(b, "rev.csv", REVIEWS), "--text-col", "review",
                    "--out", f"{b}/x"]),
     "rev.csv:1: no text column 'review'; the columns are 'text', 'label': pass --text-col"),
    ("BERT: a row without a label",
     lambda b: run([HVDTRAIN, *BERT, "--data", molecules(b, "rev2.csv", REVIEWS + "so-so,\n"),
                    "--out", f"{b}/x"]),
     "rev2.csv:6: the label ('label') is empty"),
    ("BERT: one label value only",
     lambda b: run([HVDTRAIN, *BERT, "--data", molecules(b, "rev3.csv", "text,label\na,x\nb,x\n"),
                    "--out", f"{b}/x"]),
     "classification needs at least 2"),
    ("BERT: a model directory that is not one",
     lambda b: one(*BERT, "--model", b, "--out", f"{b}/x"),
     "not a model directory"),
    ("run: a target without a function",
     lambda b: run([HVDTRAIN, "run", "docs/examples/build_fn.py", "--out", f"{b}/x"]),
     "is not MODULE:FUNCTION"),
    ("run: a module that does not import",
     lambda b: one("run", "nopkg.train:build", "--out", f"{b}/x"),
     "cannot import 'nopkg.train'"),
    ("run: a function that is not there",
     lambda b: run([HVDTRAIN, "run", "docs/examples/build_fn.py:make", "--out", f"{b}/x"]),
     "has no function 'make'; its functions: build"),
    ("run: an --arg the function does not take",
     lambda b: one("run", "docs/examples/build_fn.py:build", "--arg", "depth=3", "--out", f"{b}/x"),
     "does not fit its signature"),
    ("GPT-2: --tensor that does not divide the heads",
     lambda b: mpirun(3, "gpt2", "--tensor", "3", "--steps", "1", "--limit", "40", "--out", f"{b}/x"),
     "--tensor 3 does not divide the attention heads (4); use --tensor 1 or 2 or 4"),
    ("GPT-2: --seq-len beyond the context",
     lambda b: run([HVDTRAIN, "gpt2", "--seq-len", "100", "--steps", "1", "--out", f"{b}/x"]),
     "--seq-len 100 is longer than the tiny model's context (64)"),
    ("GPT: slice lengths that do not sum to the sequence",
     lambda b: one(*GPT1, "--slices", "16,16", "--out", f"{b}/x"),
     "--slices 16,16 sums to 32 but the sequence length is 48"),
    ("GPT: more slices than tokens",
     lambda b: one(*GPT1, "--slices", "100", "--out", f"{b}/x"),
     "--slices 100 is more than the sequence length 48"),
    ("GPT: a sequence longer than the positions",
     lambda b: one(*GPT1, "--seq-len", "300", "--out", f"{b}/x"),
     "--seq-len 300 is longer than the tiny model's 256 positions"),
    ("GPT: an empty text file",
     lambda b: one(*GPT1, "--data", _file(b, "empty.txt", b""), "--out", f"{b}/x"),
     "the file is empty; pass a UTF-8 text file"),
    ("GPT: a file that is not UTF-8",
     lambda b: one(*GPT1, "--data", _file(b, "latin1.txt", "café au lait\n".encode("latin-1") * 40),
                      "--out", f"{b}/x"),
     "is not UTF-8 text (byte 0xe9 at offset 3); save it as UTF-8 and pass a UTF-8 text file"),
    ("plan: traffic without a hostfile",
     lambda b: run([HVDTRAIN, "plan", "-np", "4", "--stages", "2", "--param-mb", "10"]),
     "--param-mb shows traffic between hosts: give --hostfile too"),
    ("plan: layout options before the model command",
     lambda b: run([HVDTRAIN, "plan", "-np", "4", "--tensor", "2", "gpt2", "--size", "tiny"]),
     "--tensor given before the model command: put the layout options after it"),
    ("plan: a command that does not train",
     lambda b: run([HVDTRAIN, "plan", "-np", "2", "gpt2", "sample", f"{b}/x"]),
     "'gpt2 sample' is not a training command; give one of mlp"),
    ("plan --auto: a memory limit nothing fits",
     lambda b: run([HVDTRAIN, "plan", "-np", "4", "--auto", "--max-memory", "1MB", *MLP]),
     "no layout of 4 ranks fits --max-memory 1 MB per rank; the least memory is"),
    ("plan --auto: a memory limit that is not a size",
     lambda b: run([HVDTRAIN, "plan", "-np", "4", "--auto", "--max-memory", "lots", *MLP]),
     "--max-memory 'lots' is not a size"),
    ("plan --auto without a model command",
     lambda b: run([HVDTRAIN, "plan", "-np", "4", "--auto"]), "--auto plans a model command"),
    ("plan: --max-memory without --auto",
     lambda b: run([HVDTRAIN, "plan", "-np", "4", "--max-memory", "2GB", *MLP]),
     "--max-memory is a limit for --auto; add --auto"),
    ("plan --auto: a model whose stage widths are its own (GROVER)",
     lambda b: run([HVDTRAIN, "plan", "-np", "4", "--auto", "grover", "pretrain", "--stages", "2"]),
     "sets its own stage widths"),
    ("plan --auto: a hostfile with no usable host",
     lambda b: run([HVDTRAIN, "plan", "-np", "4", "--auto", "--hostfile", _file(b, "nohosts", b"# none\n"),
                    *MLP]),
     "no hosts; write one line per host as 'HOSTNAME slots=N'"),
    ("--layout auto: a memory limit nothing fits (every rank)",
     lambda b: mpirun(4, *MLP, "--layout", "auto", "--max-memory", "1MB", "--out", f"{b}/x"),
     "fits --max-memory 1 MB per rank"),
    ("plan --check: a run not made with --layout auto",
     lambda b: run([HVDTRAIN, "plan", "-np", "1", "--check", prior_run(b)]), "no plan.json there"),
    ("--trace into a missing directory",
     lambda b: one("mlp", "--steps", "1", "--trace", f"{b}/no/t.json", "--out", f"{b}/x"),
     "its directory does not exist; create it or pass another path"),
    ("merge: a checkpoint of another model",
     lambda b: run([HVDTRAIN, "merge", prior_run(b), f"{b}/x"]),
     "not of hvdtrain gpt2"),
    ("merge: a target that exists",
     lambda b: run([HVDTRAIN, "merge", prior_run(b), prior_run(b)]),
     "exists; merge writes a new directory"),
]


def first_error(r: Result) -> Optional[str]:
    """The one error line, without a launcher's prefix (horovodrun adds '[0]<stderr>:')."""
    lines = [x[x.index("hvdtrain: error:"):] for x in (r.out + r.err).splitlines()
             if "hvdtrain: error:" in x]
    return lines[0] if len(lines) == 1 else None


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("name,make,expect", CASES, ids=[c[0] for c in CASES])
def test_bad_input(base: str, name: str, make: Callable[[str], Result], expect: str) -> None:
    before = snapshot(prior_run(base))
    r = make(base)
    # horovodrun reports any failed worker as its own exit code 1, with its own traceback
    by_horovodrun = "gloo" in name
    assert r.rc == (1 if by_horovodrun else 2), f"exit {r.rc}\n{r.err[-3000:]}"
    line = first_error(r)
    assert line is not None, f"want exactly one 'hvdtrain: error:' line:\n{r.out}\n{r.err}"
    assert expect in line
    assert "hvdhybrid/" not in r.err if by_horovodrun else "Traceback" not in r.err
    assert not os.path.exists(os.path.join(base, "x")), "a failed run must write nothing"
    assert snapshot(prior_run(base)) == before, "an earlier run was modified"


def main() -> None:
    import tempfile

    base = tempfile.mkdtemp()
    print("| bad input | what the user sees (exit code 2; horovodrun turns it into 1) |\n|---|---|")
    for name, make, _ in CASES:
        r = make(base)
        line = first_error(r) or "(no single error line!)"
        print(f"| {name} | `{line.replace('|', '/')}` |")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
