"""``hvdtrain gpt2`` and ``hvdtrain merge`` through the CLI: the merged checkpoint loads with plain
transformers and gives the parallel model's logits; a checkpoint resumes into other layouts."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from conftest import HVDTRAIN, max_diff, mpirun, params, run

GPT2 = ["gpt2", "--size", "tiny", "--seq-len", "32", "--limit", "400", "--batch-size", "16",
        "--no-progress", "--seed", "3", "--no-fp16-compression", "--lr", "1e-3", "--save-params"]


def test_merge_round_trip_gives_the_parallel_models_logits(tmp_path) -> None:
    out, merged = str(tmp_path / "run"), str(tmp_path / "merged")
    r = mpirun(4, *GPT2, "--tensor", "2", "--stages", "2", "--steps", "4", "--out", out)
    assert r.rc == 0, r.err[-3000:]
    r = run([HVDTRAIN, "merge", out, merged])
    assert r.rc == 0, r.err[-3000:]
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(merged).eval()
    probe = torch.load(os.path.join(out, "probe_logits.pt"))
    with torch.no_grad():
        got = model(input_ids=probe["ids"]).logits
    assert got.shape == probe["logits"].shape
    assert float((got - probe["logits"]).abs().max()) <= 1e-4
    r = run([HVDTRAIN, "merge", out, merged])  # the target exists: one line, nothing overwritten
    assert r.rc == 2 and "exists" in r.err and r.err.count("error:") == 1


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = str(tmp_path_factory.mktemp("gpt2") / "whole")
    r = mpirun(4, *GPT2, "--tensor", "2", "--steps", "6", "--out", out)
    assert r.rc == 0, r.err[-3000:]
    return out


@pytest.mark.parametrize("np_,layout", [(4, ["--stages", "2"]), (2, ["--tensor", "2"]), (1, [])],
                         ids=["tensor1-pipeline2-data2", "tensor2-on-2-ranks", "one-rank"])
def test_resume_at_another_layout_continues_as_if_never_stopped(uninterrupted: str, tmp_path, np_: int,
                                                                layout: list[str]) -> None:
    """Saved at tensor 2 x data 2 after 3 steps (AdamW: moments resharded too), resumed elsewhere."""
    saved = str(tmp_path / "saved")
    r = mpirun(4, *GPT2, "--tensor", "2", "--steps", "3", "--out", saved)
    assert r.rc == 0, r.err[-3000:]
    out = str(tmp_path / "resumed")
    shutil.copytree(saved, out)
    r = mpirun(np_, *GPT2, *layout, "--steps", "6", "--resume", "--out", out)
    assert r.rc == 0, r.err[-3000:]
    assert "at step 3" in r.err
    assert max_diff(params(out), params(uninterrupted)) <= 1e-5


@pytest.mark.parametrize("np_,layout", [
    (1, []), (4, ["--tensor", "2", "--stages", "2"]),
    (4, ["--tensor", "2", "--stages", "2", "--recompute", "full"]),
    (2, ["--stages", "2", "--schedule", "zb1", "--recompute", "selective"]),
], ids=["one-rank", "tensor2-pipeline2", "tensor2-pipeline2-recompute-full", "pipeline2-zb1-selective"])
def test_layouts_through_the_cli_match(uninterrupted: str, tmp_path, np_: int, layout: list[str]) -> None:
    """--save-params at one rank and at tensor 2 x pipeline 2 against tensor 2 x data 2 (dropout on), also
    with the activations recomputed in the backward (the same keyed dropout masks)."""
    out = str(tmp_path / "run")
    r = mpirun(np_, *GPT2, *layout, "--steps", "6", "--out", out)
    assert r.rc == 0, r.err[-3000:]
    assert max_diff(params(out), params(uninterrupted)) <= 1e-5
    memory = json.load(open(os.path.join(out, "memory.json")))
    assert len(memory) == np_ and all(m["parameters"] > 0 and m["rss_peak"] > m["parameters"] for m in memory)
    assert "saved activations peak" in r.err
