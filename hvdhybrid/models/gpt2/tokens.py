"""Text as tokens of a model's own tokenizer: documents joined by its end-of-text token, cached once.

Tokenizing Shakespeare's plays takes seconds; a run should not pay it every time,
and every rank should not pay it at all. Rank 0 tokenizes (or finds the cache),
the others receive the ids. The cache file lies beside the data
(``.<name>.tokens-<hash>.pt``, or under ``~/.cache/hvdhybrid/tokens`` where that
directory is not writable), named by a hash of the tokenizer's files and of the
text, so another tokenizer or an edited file never reads a stale cache.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import torch

__all__ = ["cache_path", "token_ids"]

FORMAT = "v1"


def cache_path(beside: str, tokenizer_files: dict[str, bytes], documents: list[str]) -> str:
    """Where the ids of ``documents`` under this tokenizer are cached (``beside``: the data's path)."""
    h = hashlib.sha256(FORMAT.encode())
    for name in sorted(tokenizer_files):
        h.update(name.encode() + b"\0" + hashlib.sha256(tokenizer_files[name]).digest())
    for d in documents:
        h.update(hashlib.sha256(d.encode("utf-8")).digest())
    folder, base = (beside, "corpus") if os.path.isdir(beside) else os.path.split(os.path.abspath(beside))
    name = f".{base}.tokens-{h.hexdigest()[:16]}.pt"
    if not os.access(folder, os.W_OK):
        folder = os.path.join(os.path.expanduser("~"), ".cache", "hvdhybrid", "tokens")
    return os.path.join(folder, name)


def token_ids(tokenizer: Any, tokenizer_files: dict[str, bytes], documents: list[str], beside: str
              ) -> tuple[torch.Tensor, bool]:
    """The ids of every document, each followed by the end-of-text token, as int32; and whether they
    came from the cache. Writes the cache atomically when it had to tokenize."""
    path = cache_path(beside, tokenizer_files, documents)
    if os.path.isfile(path):
        try:
            return torch.load(path, weights_only=True), True
        except Exception:  # a damaged cache is rebuilt, never fatal
            pass
    eos = int(tokenizer.eos_token_id)
    ids: list[int] = []
    for d in documents:
        ids += tokenizer(d, add_special_tokens=False)["input_ids"] + [eos]
    out = torch.tensor(ids, dtype=torch.int32)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    torch.save(out, tmp)
    os.replace(tmp, path)
    return out, False
