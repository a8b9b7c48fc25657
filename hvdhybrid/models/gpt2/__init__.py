"""Hugging Face GPT-2 in tensor x pipeline x data parallel (``hvdtrain gpt2``, ``hvdtrain merge``)."""
