"""The ``hvdtrain`` command line: a thin layer over the library (no training logic lives here).

    main      the click group and its entry point (one-line errors, exit code 2)
    options   click options generated from the config tree (hvdhybrid.config)
    session   one run from user input to results
    plan, launch, resnet, mlp, run_job, bert, gpt, gpt2, grover   one file per command
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import exports

__all__ = ["cli", "main"]

if TYPE_CHECKING:
    from .main import cli, main

__getattr__ = exports(__name__, {
    "cli": "main", "main": "main",
})
