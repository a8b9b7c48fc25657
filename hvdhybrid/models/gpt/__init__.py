"""GPT with TeraPipe token-dimension pipelining: ``hvdtrain gpt``, its configs and its slice planner."""
