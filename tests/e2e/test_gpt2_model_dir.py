"""hvdtrain gpt2 --model DIR through the CLI: a GPT-2 directory with its own tokenizer (vocabulary 1,001:
divisible by neither 2 nor 4) at tensor 2 x data 2, tensor 2 x pipeline 2 and tensor 4 against one process;
a padded checkpoint resumed at another tensor size; merge into a directory plain transformers loads, with
its tokenizer; sampling from a run and from the merged directory, on one rank and tensor-parallel."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import HVDTRAIN, max_diff, mpirun, params, run

BASE = ["--seq-len", "64", "--limit", "400", "--batch-size", "8", "--no-progress", "--save-params",
        "--no-fp16-compression", "--optimizer", "sgd", "--lr", "0.05", "--seed", "2"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = str(tmp_path_factory.mktemp("gpt2dir") / "model")
    r = run([HVDTRAIN, "gpt2", "make-test-model", out])
    assert r.rc == 0, r.err[-3000:]
    assert "tokenizer of 1001 tokens" in r.out
    return out


def train(model_dir: str, out: str, np_: int = 1, *extra: str, steps: int = 3) -> str:
    args = ["gpt2", "--model", model_dir, *BASE, "--steps", str(steps), "--out", out, *extra]
    r = run([HVDTRAIN, *args]) if np_ == 1 else mpirun(np_, *args, timeout=300)
    assert r.rc == 0, r.err[-3000:]
    return r.err


@pytest.fixture(scope="module")
def one(model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    out = str(tmp_path_factory.mktemp("gpt2dir") / "one")
    log = train(model_dir, out)
    assert "vocabulary 1001, tensor 1" in log and "sample (greedy):" in log
    return out


@pytest.mark.parametrize("layout, padded", [
    (["--tensor", "2"], 1002), (["--tensor", "2", "--stages", "2"], 1002), (["--tensor", "4"], 1004),
], ids=["t2xd2", "t2xp2", "t4"])
def test_layouts_of_a_directory_match_one_process(model_dir: str, one: str, tmp_path, layout: list[str],
                                                  padded: int) -> None:
    from safetensors.torch import load_file

    out = str(tmp_path / "run")
    log = train(model_dir, out, 4, *layout)
    assert f"vocabulary 1001 (padded to {padded} for tensor {layout[1]})" in log
    got, ref = params(out), params(one)
    assert got["transformer.wte.weight"].shape == (1001, 64)
    assert max_diff(got, ref) <= 1e-5
    start = load_file(os.path.join(model_dir, "model.safetensors"))
    name = "transformer.h.0.mlp.c_fc.weight"
    assert float((got[name] - start[name]).abs().max()) > 1e-4  # it trained


def test_a_padded_checkpoint_resumes_at_another_tensor_size(model_dir: str, one: str, tmp_path) -> None:
    cut = str(tmp_path / "cut")
    train(model_dir, cut, 2, "--tensor", "2", steps=2)  # padded to 1002
    log = train(model_dir, cut, 4, "--tensor", "4", "--resume", steps=3)  # padded to 1004
    assert "at step 2" in log
    assert max_diff(params(cut), params(one)) <= 1e-5


def test_merge_loads_in_plain_transformers_with_the_runs_logits_and_loss(model_dir: str, tmp_path) -> None:
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from hvdhybrid.models.gpt2.data import shakespeare_plays, shakespeare_root, windows
    from hvdhybrid.models.gpt2.pretrained import ModelDir
    from hvdhybrid.models.gpt2.tokens import token_ids

    out, merged = str(tmp_path / "run"), str(tmp_path / "merged")
    train(model_dir, out, 4, "--tensor", "2", "--stages", "2")
    r = run([HVDTRAIN, "merge", out, merged])
    assert r.rc == 0, r.err[-3000:]
    files = {"tokenizer.json", "tokenizer_config.json", "config.json", "model.safetensors"}
    assert files <= set(os.listdir(merged))
    model, tok = GPT2LMHeadModel.from_pretrained(merged).eval(), AutoTokenizer.from_pretrained(merged)
    assert model.config.vocab_size == len(tok) == 1001
    probe = torch.load(os.path.join(out, "probe_logits.pt"))
    with torch.no_grad():
        assert float((model(probe["ids"]).logits - probe["logits"]).abs().max()) <= 1e-5
        md = ModelDir.open(merged)
        ids, cached = token_ids(md.tokenizer, md.tokenizer_files, shakespeare_plays(), shakespeare_root())
        assert cached  # the run tokenized with the same tokenizer files
        test = windows(ids, 64, 400).split(0.05, seed=0)[1]
        logits = model(test.x).logits
        flat = logits.reshape(-1, logits.shape[-1])
        loss = float(torch.nn.functional.cross_entropy(flat, test.y.reshape(-1)))
    reported = json.load(open(os.path.join(out, "summary.json")))["test_loss"]
    assert abs(loss - reported) <= 1e-5 * max(1.0, abs(reported))

    # sampling: the run's checkpoint (another layout: whole), the merged directory, tensor-parallel
    base = ["--prompt", "ROMEO:", "--tokens", "12", "--top-k", "5", "--seed", "3"]
    texts = [run([HVDTRAIN, "gpt2", "sample", out, *base]), mpirun(2, "gpt2", "sample", merged, *base)]
    assert all(t.rc == 0 for t in texts), [t.err[-2000:] for t in texts]
    assert len({t.out for t in texts}) == 1 and texts[0].out.startswith("ROMEO:")
    assert len(texts[0].out) > len("ROMEO:") + 5


def test_gpt_samples_from_a_tensor_parallel_run(tmp_path) -> None:
    out = str(tmp_path / "gpt")
    r = mpirun(2, "gpt", "--tensor", "2", "--steps", "2", "--seq-len", "64", "--limit", "64", "--no-progress",
               "--out", out)
    assert r.rc == 0, r.err[-3000:]
    assert "sample (greedy):" in r.err
    one = run([HVDTRAIN, "gpt", "sample", out, "--prompt", "KING", "--tokens", "8", "--top-k", "3"])
    two = mpirun(2, "gpt", "sample", out, "--prompt", "KING", "--tokens", "8", "--top-k", "3")
    assert one.rc == 0 and two.rc == 0, one.err[-2000:] + two.err[-2000:]
    assert one.out == two.out and one.out.startswith("KING")
