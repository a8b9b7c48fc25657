"""Click options made from the config tree's fields: every knob is declared once, in hvdhybrid.config."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable, Optional

import click

from ..comm.agreement import agreed, world
from ..config import Config, option_fields
from ..errors import USER_ERRORS, UserError
from ..layout.hostfile import MAP_BY

__all__ = ["config_options", "field_option", "map_by_option", "optimizer_fn", "optimizer_option"]

_TYPES = {"int": int, "float": float, "str": str, "Optional[int]": int, "Optional[float]": float,
          "Optional[str]": str, "bool": bool}


def field_option(name: str, default: Any = dataclasses.MISSING) -> Callable[[Any], Any]:
    """The click option of config field ``name`` (``--batch-size``), with its declared help and checks.

    ``default`` overrides the field's default (a model's own, e.g. ``--steps 150`` for mlp).
    """
    _, f = option_fields()[name]
    meta = f.metadata
    value = f.default if default is dataclasses.MISSING else default
    kind = _TYPES[str(f.type)]
    kw: dict[str, Any] = {"default": value, "help": meta["help"], "show_default": value is not None}
    if meta["flag"] and kind is bool:  # --x/--no-x
        return click.option(meta["flag"], name, **kw)
    flag = meta["flag"] or "--" + name.replace("_", "-")
    if kind is bool:
        return click.option(flag, name, is_flag=True, default=value, help=meta["help"])
    if meta["choices"]:
        kw["type"] = click.Choice(list(meta["choices"]))
    elif meta["path"]:
        kw["type"] = click.Path(file_okay=name != "out")
    else:
        kw["type"] = kind
    if meta["metavar"]:
        kw["metavar"] = meta["metavar"]
    extra = ["-m"] if name == "microbatches" else []
    return click.option(flag, *extra, name, **kw)


def config_options(only: Optional[Iterable[str]] = None, collective: bool = True,
                   **defaults: Any) -> Callable[..., Any]:
    """Decorator: every command-line field of the config tree (or ``only`` those) as options, handed to
    the command as one checked :class:`Config` (first argument ``cfg``).

    ``defaults`` are the command's own defaults by field name (``steps=150, lr=0.05``). The tree is
    built, and so checked, once on every rank with the ranks agreeing (one line, exit code 2);
    ``collective=False`` for a command that runs alone (``plan``): no MPI, the same one line. A
    group invoked for one of its subcommands skips it.
    """
    names = [n for n, (_, f) in option_fields().items() if f.metadata["cli"]]
    if only is not None:
        names = [n for n in names if n in set(only)]
    unknown = sorted(set(defaults) - set(names))
    assert not unknown, f"defaults for fields that are not options here: {unknown}"
    opts = [field_option(n, defaults.get(n, dataclasses.MISSING)) for n in names]

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(**kw: Any) -> Any:
            values = {n: kw.pop(n) for n in names}
            ctx = click.get_current_context(silent=True)
            if ctx is not None and ctx.invoked_subcommand is not None:
                return fn(None, **kw)
            if not collective:
                try:
                    return fn(Config.from_flat(**values), **kw)
                except USER_ERRORS as e:
                    raise UserError(str(e)) from None
            with agreed(world()):
                cfg = Config.from_flat(**values)
            return fn(cfg, **kw)
        for o in reversed(opts):
            wrapper = o(wrapper)
        return wrapper
    return deco


map_by_option = click.option(
    "--map-by", type=click.Choice(MAP_BY), default="slot", show_default=True,
    help="Ranks onto hosts as mpirun --map-by does: slot keeps a bundle's stages on one host, node deals "
         "ranks round-robin over the hosts (hvdtrain plan --hostfile shows the traffic of each).")

OPTIMIZERS = ("adamw", "sgd")

optimizer_option = click.option(
    "--optimizer", type=click.Choice(OPTIMIZERS), default="adamw", show_default=True,
    help="adamw: weight decay 0.01; sgd: momentum 0.9 (matches across layouts to 1e-5).")
"""The ``--optimizer`` option of the models that offer AdamW or SGD (read with :func:`optimizer_fn`)."""


def optimizer_fn(name: str, lr: float) -> Callable[..., Any]:
    """``params -> optimizer`` for ``--optimizer NAME`` at ``--lr``: AdamW (weight decay 0.01) or
    SGD (momentum 0.9). AdamW is the fused kernel: one pass over each tensor, no whole-size temporaries."""
    import torch

    def make(params: Any) -> Any:
        if name == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=0.9)
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01, fused=True)  # one pass, no temporaries
    return make
