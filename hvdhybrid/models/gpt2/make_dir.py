"""A small GPT-2 directory made here, not downloaded: a ``GPT2Config`` model and a byte-level BPE tokenizer.

For tests and examples, and for a user who wants to try ``hvdtrain gpt2 --model DIR``
without a hub: ``hvdtrain gpt2 make-test-model DIR`` (or :func:`make_model_dir`).
The tokenizer is trained with the ``tokenizers`` library on the start of the
text (Shakespeare's plays by default); its vocabulary (1,001 by default) divides
by no even tensor size, as GPT-2's 50,257 does not. The weights are GPT-2's
random initialisation under ``seed``. Both are saved with ``save_pretrained``,
so ``GPT2LMHeadModel.from_pretrained(DIR)`` and ``AutoTokenizer.from_pretrained(DIR)``
load them offline.
"""

from __future__ import annotations

import os
from typing import Any, Optional

__all__ = ["EOS", "make_model_dir"]

EOS = "<|endoftext|>"


def make_model_dir(out: str, vocab: int = 1001, layers: int = 2, hidden: int = 64, heads: int = 4,
                   positions: int = 128, text: Optional[str] = None, train_chars: int = 1_000_000,
                   seed: int = 0) -> tuple[Any, Any]:
    """Write a GPT-2 model and its tokenizer to the new directory ``out``; returns (model, tokenizer).

    Raises:
        FileExistsError: ``out`` exists (nothing is overwritten).
    """
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

    from .data import shakespeare

    if os.path.exists(out):
        raise FileExistsError(f"{out} exists; pass a new directory")
    source = (text if text is not None else shakespeare())[:train_chars]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([source], vocab_size=vocab, min_frequency=2, special_tokens=[EOS],
                            show_progress=False)
    tok = GPT2Tokenizer(tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS)
    config = GPT2Config(vocab_size=len(tok), n_positions=positions, n_embd=hidden, n_layer=layers,
                        n_head=heads, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                        tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    os.makedirs(out)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return model, tok
