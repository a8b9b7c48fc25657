"""GROVER's named model sizes (no torch import: the CLI lists them cheaply)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GroverConfig", "CONFIGS"]


@dataclass(frozen=True)
class GroverConfig:
    hidden: int
    heads: int
    layers: int  # MTBlocks per view
    hops: int  # mean dyMPN hops; training draws hops-1 .. hops+1
    ffn: int  # width of the heads' hidden layer
    dropout: float = 0.0


CONFIGS: dict[str, GroverConfig] = {
    "tiny": GroverConfig(hidden=32, heads=2, layers=2, hops=2, ffn=32),
    "small": GroverConfig(hidden=128, heads=4, layers=2, hops=3, ffn=128),
    "base": GroverConfig(hidden=800, heads=4, layers=3, hops=3, ffn=700, dropout=0.1),
    "large": GroverConfig(hidden=1200, heads=4, layers=3, hops=3, ffn=1000, dropout=0.1),
}
