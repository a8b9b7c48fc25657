"""GPT-2 from a directory: the checks, slices read per shard (padding included), the token cache,
padded shards joined without their padding, sampling."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from hvdhybrid.models.gpt2.make_dir import make_model_dir
from hvdhybrid.models.gpt2.pretrained import ModelDir, ModelDirError, shard_ranges
from hvdhybrid.models.gpt2.tokens import cache_path, token_ids
from hvdhybrid.models.sampling import ByteCodec, generate
from hvdhybrid.parallel.ownership import Sharded, cut, join


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = str(tmp_path_factory.mktemp("gpt2") / "model")
    from hvdhybrid.models.gpt2.data import shakespeare

    model, tok = make_model_dir(out, vocab=301, text=shakespeare()[:200_000], positions=32)
    assert len(tok) == model.config.vocab_size == 301
    return out


def test_a_made_directory_opens_with_its_tokenizer(model_dir: str) -> None:
    from transformers import AutoTokenizer, GPT2LMHeadModel

    md = ModelDir.open(model_dir)
    assert md.config.model_type == "gpt2" and "tokenizer.json" in md.tokenizer_files
    assert md.tokenizer.eos_token_id is not None and md.config.vocab_size % 2 == 1
    assert len(AutoTokenizer.from_pretrained(model_dir)) == GPT2LMHeadModel.from_pretrained(
        model_dir).config.vocab_size


@pytest.mark.parametrize("shard", [None, Sharded(0, 2, 0, pad=1), Sharded(0, 2, 1, pad=1),
                                   Sharded(0, 4, 3, pad=3), Sharded(1, 2, 1, parts=3), Sharded(1, 4, 2)])
def test_each_shard_reads_its_slice_padding_as_zeros(model_dir: str, shard: Sharded) -> None:
    from safetensors.torch import load_file

    full = load_file(os.path.join(model_dir, "model.safetensors"))
    name = "transformer.wte.weight" if shard is None or shard.dim == 0 else \
        "transformer.h.0.attn.c_attn.weight"
    got = ModelDir.open(model_dir).reader().read(name, shard)
    assert torch.equal(got, cut(full[name], shard))
    if shard is not None and shard.pad and shard.index == shard.size - 1:
        assert got[-shard.pad:].abs().sum() == 0


def test_the_tied_head_and_hub_names_are_found(model_dir: str, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    reader = ModelDir.open(model_dir).reader()
    assert torch.equal(reader.read("lm_head.weight", None), reader.read("transformer.wte.weight", None))
    hub = str(tmp_path / "hub")
    shutil.copytree(model_dir, hub)  # GPT-2 on the hub was saved from GPT2Model: no "transformer."
    sd = load_file(os.path.join(hub, "model.safetensors"))
    bare = {k.removeprefix("transformer."): v for k, v in sd.items()}
    save_file(bare, os.path.join(hub, "model.safetensors"))
    got = ModelDir.open(hub).reader().read("transformer.h.1.mlp.c_fc.bias", Sharded(0, 2, 1))
    assert torch.equal(got, cut(sd["transformer.h.1.mlp.c_fc.bias"], Sharded(0, 2, 1)))


def test_padded_shards_join_without_padding() -> None:
    w = torch.randn(1001, 8)
    for t in (2, 4, 8):
        s = [Sharded(0, t, i, pad=(-1001) % t) for i in range(t)]
        pieces = [cut(w, x) for x in s]
        assert all(p.shape[0] == (1001 + s[0].pad) // t for p in pieces)
        assert torch.equal(join(pieces, 0, 1, s[0].pad), w)
    assert shard_ranges(1001, Sharded(0, 4, 3, pad=3)) == [(753, 1004)]
    assert shard_ranges(12, Sharded(0, 2, 1, parts=3)) == [(2, 4), (6, 8), (10, 12)]


def edited(model_dir: str, tmp_path, name: str, **config: object) -> str:
    d = str(tmp_path / name)
    shutil.copytree(model_dir, d)
    c = json.load(open(os.path.join(d, "config.json")))
    c.update(config)
    json.dump(c, open(os.path.join(d, "config.json"), "w"))
    return d


def test_bad_directories_are_one_line_with_the_fix(model_dir: str, tmp_path) -> None:
    cases = [(str(tmp_path / "nope"), "no such directory")]
    bare = edited(model_dir, tmp_path, "bare")
    os.remove(os.path.join(bare, "tokenizer.json"))
    cases.append((bare, "has no tokenizer (tokenizer.json, or vocab.json and merges.txt)"))
    cases.append((edited(model_dir, tmp_path, "bert", model_type="bert"), "holds a 'bert' model"))
    cases.append((edited(model_dir, tmp_path, "small", vocab_size=300),
                  "the tokenizer has 301 tokens but the embedding 300 rows"))
    noweights = edited(model_dir, tmp_path, "noweights")
    os.remove(os.path.join(noweights, "model.safetensors"))
    cases.append((noweights, "has no weights (model.safetensors or pytorch_model.bin)"))
    for path, expect in cases:
        with pytest.raises(ModelDirError) as e:
            ModelDir.open(path)
        assert expect in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_tokens_are_cached_by_tokenizer_and_text(model_dir: str, tmp_path) -> None:
    md = ModelDir.open(model_dir)
    data = tmp_path / "text.txt"
    data.write_text("first")
    docs = ["To be, or not to be", "that is the question"]
    ids, cached = token_ids(md.tokenizer, md.tokenizer_files, docs, str(data))
    assert not cached and int(ids[-1]) == md.tokenizer.eos_token_id
    assert (ids == md.tokenizer.eos_token_id).sum() == 2  # one after each document
    again, cached = token_ids(md.tokenizer, md.tokenizer_files, docs, str(data))
    assert cached and torch.equal(ids, again)
    assert os.path.dirname(cache_path(str(data), md.tokenizer_files, docs)) == str(tmp_path)
    other = dict(md.tokenizer_files, **{"tokenizer_config.json": b"{}"})
    assert cache_path(str(data), other, docs) != cache_path(str(data), md.tokenizer_files, docs)
    first = cache_path(str(data), md.tokenizer_files, docs[:1])
    assert first != cache_path(str(data), md.tokenizer_files, docs)


def test_generation_is_greedy_or_seeded_top_k() -> None:
    table = torch.randn(7, 7)

    def nxt(ids: torch.Tensor) -> torch.Tensor:
        return table[int(ids[0, -1])]
    greedy = generate(nxt, [1], 5, context=4)
    assert greedy[0] == int(table[1].argmax())
    assert generate(nxt, [1], 20, 4, top_k=3, seed=5) == generate(nxt, [1], 20, 4, top_k=3, seed=5)
    assert generate(nxt, [1], 20, 4, top_k=3, seed=5) != generate(nxt, [1], 20, 4, top_k=3, seed=6)
    assert ByteCodec().decode(ByteCodec().encode("héllo")) == "héllo"


def test_bin_weights_and_a_sharded_index_read_alike(model_dir: str, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    sd = load_file(os.path.join(model_dir, "model.safetensors"))
    shard = Sharded(0, 4, 3, pad=3)
    want = cut(sd["transformer.wte.weight"], shard)
    as_bin = str(tmp_path / "bin")
    shutil.copytree(model_dir, as_bin)
    os.remove(os.path.join(as_bin, "model.safetensors"))
    torch.save(sd, os.path.join(as_bin, "pytorch_model.bin"))
    split = str(tmp_path / "split")
    shutil.copytree(model_dir, split)
    os.remove(os.path.join(split, "model.safetensors"))
    names = sorted(sd)
    halves = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2:]}
    for f, ns in halves.items():
        save_file({n: sd[n] for n in ns}, os.path.join(split, f))
    index = {"weight_map": {n: f for f, ns in halves.items() for n in ns}}
    json.dump(index, open(os.path.join(split, "model.safetensors.index.json"), "w"))
    for d in (as_bin, split):
        reader = ModelDir.open(d).reader()
        assert torch.equal(reader.read("transformer.wte.weight", shard), want)
        assert torch.equal(reader.read("transformer.ln_f.bias", None), sd["transformer.ln_f.bias"])
