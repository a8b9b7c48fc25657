"""Rank-tagged logging: every line says who speaks, ``[rank 3 | bundle 1 | stage 0]``."""

from __future__ import annotations

import logging
import sys

__all__ = ["get_logger", "tag_logger"]

_LOGGER = "hvdhybrid"


def get_logger() -> logging.Logger:
    return logging.getLogger(_LOGGER)


def tag_logger(tag: str, verbose: bool = False) -> logging.Logger:
    """(Re)configure the package logger with this rank's tag, writing to stderr."""
    log = get_logger()
    for h in list(log.handlers):
        log.removeHandler(h)
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter(f"[{tag}] %(message)s"))
    log.addHandler(h)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False
    return log
