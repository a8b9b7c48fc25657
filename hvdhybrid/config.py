"""One config tree: frozen sections (parallel, pipeline, optim, comm, run), each field declared once.

Every field carries its help text (and its command-line spelling where it has
one) in its metadata; :mod:`hvdhybrid.cli.options` turns the fields into click
options, so a knob is declared here and nowhere else. Each section checks its
own fields in ``__post_init__`` with the value seen and the fix; checks that need
the layout are :func:`check_batch`. A value known only later (planned token
slices, steps from epochs, the output directory) makes a new tree with
:meth:`Config.resolved`, which checks again: nothing is patched after
validation. ``config.json`` in every run is :meth:`Config.to_dict`. The module is over 350 lines:
every knob of every command is declared here, once, which is the point of it.

    cfg = Config.from_flat(steps=100, batch_size=64, tensor=2)   # or TrainConfig(...)
    cfg.optim.steps, cfg.parallel.tensor                         # 100, 2
    layout = cfg.parallel.layout(world_size=8)                   # the one way to a Layout
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

from .errors import InputError
from .layout.placement import Placement, PlacementError
from .layout.rows import BatchError
from .layout.rows import check_batch as _check_rows
from .layout.topology import Layout, LayoutError, parse_bundle_shape
from .parallel.recompute import Recompute
from .pipeline.schedules import NAMES, SPLIT_W
from .pipeline.virtual import V_SCHEDULES
from .training import lr_schedule

__all__ = ["CommConfig", "Config", "ConfigError", "OptimConfig", "ParallelConfig", "PipelineConfig",
           "PRECISIONS", "RunConfig", "SECTIONS", "TrainConfig", "check_batch", "option_fields"]

PRECISIONS = ("fp32", "bf16", "fp16")
PARTITIONS = ("uniform", "params", "time")
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(InputError):
    """A configuration value out of range; the message names the value and the fix."""


def knob(default: Any, help: str, *, flag: Optional[str] = None, choices: Optional[tuple[str, ...]] = None,
         metavar: Optional[str] = None, cli: bool = True, path: bool = False) -> Any:
    """A config field: its default, its help text, and how the command line spells it.

    ``flag`` overrides the option name (``--fp16-compression/--no-fp16-compression``); a bool
    field without one is an on-flag; ``cli=False`` keeps a field off the command line (values
    resolved later, or only for the Python API).
    """
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices,
                                            "metavar": metavar, "cli": cli, "path": path})


def _at_least(name: str, value: Optional[float], low: float, fix: str = "") -> None:
    if value is not None and not value >= low:
        raise ConfigError(f"{name} must be >= {low:g}, got {value}{'; ' + fix if fix else ''}")


@dataclass(frozen=True)
class ParallelConfig:
    """How the world is cut: stages, their widths, tensor ranks, stages per rank, placement."""

    stages: Optional[int] = knob(None, "Pipeline stages per bundle, one stage group each (default: the "
                                       "model's).")
    bundle_shape: Optional[str] = knob(None, "Ranks per stage group, e.g. 2,1: 2 front ranks, 1 rear rank.",
                                       metavar="W0,W1,..")
    tensor: int = knob(1, "Ranks that split each stage's tensors (heads, MLP, vocabulary); a model that "
                          "cannot split its tensors refuses more than 1.")
    stages_per_rank: int = knob(1, "Model stages per stage group: cut the model finer than the ranks "
                                   "(with --placement).")
    placement: str = knob("auto", "Which stage group runs each model stage when --stages-per-rank > 1 "
                                  "(auto: v for the zbv and vhalf schedules, else looped).",
                          metavar="auto|looped|contiguous|v|P0,P1,..")
    partition: str = knob("params", "How layers are cut into stages.", choices=PARTITIONS)
    layout_choice: str = knob("manual", "auto: the planner weighs every layout of the world (tensor, "
                                        "stages, schedule, microbatches, --zero, --recompute) on costs "
                                        "measured here and trains the fastest (hvdtrain plan --auto).",
                              choices=("manual", "auto"), flag="--layout")
    max_memory: Optional[str] = knob(None, "With --layout auto: the most memory a rank may use (e.g. 2GB).",
                                     metavar="BYTES")

    def __post_init__(self) -> None:
        if self.stages is not None and self.bundle_shape is not None:
            raise LayoutError(f"give either --stages or --bundle-shape, not both (got --stages "
                              f"{self.stages} and --bundle-shape {self.bundle_shape})")
        if self.stages is not None and self.stages < 1:
            raise LayoutError(f"--stages must be >= 1, got {self.stages}")
        if self.bundle_shape is not None:
            parse_bundle_shape(self.bundle_shape)
        if self.tensor < 1:
            raise LayoutError(f"--tensor must be >= 1, got {self.tensor}; use 1 to keep tensors whole")
        if self.stages_per_rank < 1:
            raise LayoutError(f"--stages-per-rank must be >= 1, got {self.stages_per_rank}")
        if self.partition not in PARTITIONS:
            raise ConfigError(f"--partition {self.partition!r}: choose one of {', '.join(PARTITIONS)}")

    def widths(self, default: tuple[int, ...] = (1,)) -> tuple[int, ...]:
        """Stage widths: ``--bundle-shape``, else ``--stages`` stage groups of one, else ``default``."""
        if self.bundle_shape is not None:
            return parse_bundle_shape(self.bundle_shape)
        if self.stages is not None:
            return (1,) * self.stages
        return tuple(default)

    def layout(self, world_size: int, default_widths: tuple[int, ...] = (1,),
               widths: Optional[tuple[int, ...]] = None) -> Layout:
        """The one function from user input to a :class:`Layout` (raises ``LayoutError`` with the fix).

        ``widths``: a model's own rule already turned ``--stages`` into widths (GROVER's task parallelism).
        """
        return Layout(world_size, widths if widths is not None else self.widths(default_widths), self.tensor)

    def model_stages(self, layout: Layout) -> int:
        """Model stages: stage groups x ``--stages-per-rank``."""
        return layout.num_stages * self.stages_per_rank

    def placement_name(self, schedule: str = "") -> str:
        """``--placement``, ``auto`` resolved for ``schedule``: ``v`` for the V schedules, else looped."""
        if self.placement.strip().lower() != "auto":
            return self.placement
        return "v" if schedule in V_SCHEDULES else "looped"

    def placement_for(self, layout: Layout, schedule: str = "") -> Optional[Placement]:
        """``--placement`` of the model stages on the layout's stage groups (None: one each)."""
        if self.stages_per_rank == 1:
            return None
        try:
            name = self.placement_name(schedule)
            return Placement.parse(name, self.model_stages(layout), layout.num_stages)
        except PlacementError as e:
            raise PlacementError(
                f"--placement: {e} (positions: the stage groups of --stages/--bundle-shape)") from None


@dataclass(frozen=True)
class PipelineConfig:
    """How a step runs through the stages: microbatches, schedule, token slices, recomputation."""

    microbatches: int = knob(1, "Microbatches per pass through the pipeline.")
    schedule: str = knob("1f1b", "Pipeline schedule: gpipe, 1f1b, zb1 (zero bubble, W split off), "
                                 "interleaved (1F1B over --stages-per-rank looped stages), zbv and vhalf "
                                 "(2 stages per rank in a V: zero bubble; half the activations).",
                         choices=tuple(sorted(NAMES)))
    slices: Optional[tuple[int, ...]] = knob(None, "Token slices of every sequence (TeraPipe; None: whole).",
                                            cli=False)
    recompute: str = knob("none", "Recompute activations in the backward instead of keeping them: full "
                                  "(a stage keeps only its inputs), selective (the attention core of gpt, "
                                  "gpt2, bert); :S0,S1,.. for those model stages only (e.g. full:0,1).",
                          metavar="none|full|selective[:S0,S1,..]")
    batch_w: int = knob(0, "Weight gradients of this many microbatches of a stage as one product per "
                           "layer (zb1, zbv, vhalf; 1: one at a time; 0: auto, where docs/benchmarks.md "
                           "measured it faster: all of a step's with zb1, which then holds activations as "
                           "gpipe does).",
                        metavar="N")

    def __post_init__(self) -> None:
        _at_least("--microbatches", self.microbatches, 1)
        _at_least("--batch-w", self.batch_w, 0, "0 picks the measured default")
        if self.batch_w > 1 and self.schedule not in SPLIT_W:
            raise ConfigError(f"--batch-w {self.batch_w}: schedule {self.schedule} computes weight gradients "
                              f"inside B; use one that splits W ({', '.join(SPLIT_W)}) or drop --batch-w")
        if self.batch_w > 1 and self.slices is not None and len(self.slices) > 1:
            raise ConfigError(f"--batch-w {self.batch_w}: with token slices each W runs a whole backward and "
                              "cannot be batched; drop --batch-w or --slices")
        Recompute.parse(self.recompute)
        if self.schedule not in NAMES:
            raise ConfigError(f"--schedule {self.schedule!r}: choose one of {', '.join(sorted(NAMES))}")
        if self.slices is not None and (not self.slices or any(n < 1 for n in self.slices)):
            raise ConfigError(f"token slices {list(self.slices)} must be positive lengths")

    def weights_per_w(self) -> int:
        """Microbatches per ``W`` action: ``--batch-w``, 0 resolved (all of a step's for zb1 with whole
        sequences, where it measured faster; else 1: the V schedules' ``W`` fill their bubbles, and
        ``--recompute full``'s batched products would recompute a layer per product they read)."""
        if self.batch_w:
            return self.batch_w
        sliced = self.slices is not None and len(self.slices) > 1
        full = self.recompute.partition(":")[0] == "full"
        return self.microbatches if self.schedule == "zb1" and not sliced and not full else 1


@dataclass(frozen=True)
class OptimConfig:
    """What one optimizer step is and how it moves: batch, accumulation, steps, learning rate, precision."""

    steps: int = knob(10, "Optimizer steps (in all, counting those before a resume).")
    epochs: Optional[int] = knob(None, "Train this many passes over the training rows instead (sets --steps "
                                       "to epochs x rows // batch size; each epoch is a new shuffle).")
    batch_size: int = knob(64, "Global batch of one optimizer step (all bundles, all passes).")
    accumulate: int = knob(1, "Passes whose gradients add up to one optimizer step.")
    lr: float = knob(1e-3, "Learning rate (the peak, after --warmup).")
    warmup: int = knob(0, "Steps of linear learning-rate warmup from 0 to --lr.")
    lr_schedule: str = knob("constant", "After the warmup: keep --lr, or decay it to 0 at the last step.",
                            choices=lr_schedule.SCHEDULES)
    clip_grad: float = knob(0.0, "Clip the whole model's gradient to this L2 norm (0: off).")
    precision: str = knob("fp32", "bf16: autocast; fp16: autocast with dynamic loss scaling (for GPUs).",
                          choices=PRECISIONS)
    zero: int = knob(0, "Shard over each data group (the bundles): 1 the optimizer state, 2 also the "
                        "averaged gradients (reduce-scatter); 0 keeps whole copies.", metavar="0|1|2")

    def __post_init__(self) -> None:
        _at_least("--steps", self.steps, 0)
        _at_least("--epochs", self.epochs, 1)
        _at_least("--batch-size", self.batch_size, 1)
        _at_least("--accumulate", self.accumulate, 1)
        if self.batch_size % self.accumulate:
            raise BatchError(f"--batch-size {self.batch_size} is not divisible by --accumulate "
                             f"{self.accumulate}; use --batch-size "
                             f"{max(self.accumulate, self.batch_size // self.accumulate * self.accumulate)}")
        _at_least("--clip-grad", self.clip_grad, 0.0, "0 turns clipping off")
        lr_schedule.check(self.lr_schedule, self.warmup, self.steps)
        if self.zero not in (0, 1, 2):
            raise ConfigError(f"--zero {self.zero} is unknown; choose 0, 1 or 2")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision {self.precision!r} is unknown; choose one of "
                              f"{', '.join(PRECISIONS)}")

    @property
    def per_pass(self) -> int:
        """Rows of one accumulation pass."""
        return self.batch_size // self.accumulate


REDUCE_MODES = ("after", "overlap", "microbatch")


@dataclass(frozen=True)
class CommConfig:
    """How ranks talk: the gradient all-reduce across bundles, and how long a rank may wait."""

    fp16_compression: bool = knob(True, "Send gradients across bundles as float16.",
                                  flag="--fp16-compression/--no-fp16-compression")
    timeout: float = knob(300.0, "Seconds a rank may wait for a peer before the job is stopped.")
    reduce: str = knob("after", "When gradients are averaged across bundles: after the rank's schedule, "
                                "or overlapped with its last backward, bucket by bucket as they become "
                                "final (needs one row per stage group and no ties across ranks; not "
                                "with --zero 2); microbatch: with --zero 2, each microbatch's gradients "
                                "go to their owners as its backward ends (no whole gradients held; M "
                                "times the traffic).", choices=REDUCE_MODES)

    def __post_init__(self) -> None:
        if not self.timeout > 0:
            raise ConfigError(f"--timeout must be positive, got {self.timeout}")
        if self.reduce not in REDUCE_MODES:
            raise ConfigError(f"--reduce {self.reduce!r}: choose one of {', '.join(REDUCE_MODES)}")


@dataclass(frozen=True)
class RunConfig:
    """This run: seed, where results go, checkpoints, devices, what is printed and saved."""

    seed: int = knob(0, "Seed of the model's initial parameters, the sampler and every keyed draw.")
    out: Optional[str] = knob(None, "Output directory (default: runs/<model>-<time>).", path=True)
    device: str = knob("auto", "Where each rank computes: its local GPU where there is one, else the CPU.",
                       choices=DEVICES)
    threads: int = knob(0, "Torch threads per rank (0: cores / ranks on this host).")
    save_params: bool = knob(False, "Write the final parameters to OUT/params.pt (by full-model name).")
    progress: bool = knob(True, "Progress bar on rank 0 (else a log line per step).",
                          flag="--progress/--no-progress")
    checkpoint_every: int = knob(0, "Steps between checkpoints (0: only at the end).")
    checkpoint_async: bool = knob(True, "Write the --checkpoint-every checkpoints in the background (a copy "
                                        "of the state is taken at the step; training waits only for it).",
                                  flag="--checkpoint-async/--checkpoint-sync")
    keep: int = knob(3, "Complete checkpoints kept.")
    resume: bool = knob(False, "Continue the run in --out from its newest complete checkpoint.")
    trace: Optional[str] = knob(None, "Write a Chrome trace of every rank's actions (Perfetto, "
                                      "chrome://tracing).", metavar="FILE", path=True)
    log_every: int = knob(1, "Steps between log lines when there is no progress bar.", cli=False)
    model_name: str = knob("model", "The model's name, checked when a checkpoint is resumed.", cli=False)

    def __post_init__(self) -> None:
        _at_least("--threads", self.threads, 0, "0 picks cores / ranks on this host")
        _at_least("--checkpoint-every", self.checkpoint_every, 0, "0 writes one at the end")
        _at_least("--keep", self.keep, 1)
        _at_least("log_every", self.log_every, 0)


SECTIONS: dict[str, type] = {"parallel": ParallelConfig, "pipeline": PipelineConfig, "optim": OptimConfig,
                             "comm": CommConfig, "run": RunConfig}


def option_fields() -> dict[str, tuple[str, dataclasses.Field[Any]]]:
    """Every field of every section by its (unique) name: ``name -> (section, field)``."""
    out: dict[str, tuple[str, dataclasses.Field[Any]]] = {}
    for sec, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f.name not in out, f"config field {f.name} declared twice"
            out[f.name] = (sec, f)
    return out


@dataclass(frozen=True)
class Config:
    """The whole configuration of a run: one frozen section per concern."""

    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        if self.comm.reduce == "microbatch" and self.optim.zero != 2:
            raise ConfigError(f"--reduce microbatch sends each microbatch's gradients to their owners, which "
                              f"--zero 2 has and --zero {self.optim.zero} has not; add --zero 2")

    @classmethod
    def from_flat(cls, **values: Any) -> Config:
        """A tree from field names (``steps=10, tensor=2``); each section checks its fields.

        Raises:
            ConfigError (or the section's own InputError): a value out of range, or an unknown name.
        """
        return cls().resolved(**values)

    def resolved(self, **changes: Any) -> Config:
        """A new tree with ``changes`` (by field name), checked again; this one is left as it is."""
        fields = option_fields()
        unknown = sorted(set(changes) - set(fields))
        if unknown:
            raise ConfigError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
        by_section: dict[str, dict[str, Any]] = {}
        for name, value in changes.items():
            by_section.setdefault(fields[name][0], {})[name] = value
        return dataclasses.replace(self, **{sec: dataclasses.replace(getattr(self, sec), **vals)
                                            for sec, vals in by_section.items()})

    def to_dict(self) -> dict[str, Any]:
        """The tree as nested dicts (what ``config.json`` holds)."""
        return dataclasses.asdict(self)


def TrainConfig(**values: Any) -> Config:  # noqa: N802 - the public name of the Trainer's knobs
    """The Trainer's knobs by name, as a :class:`Config` tree (``hvdhybrid.TrainConfig(steps=10, ...)``).

    ``fp16=`` is the old name of ``fp16_compression=`` (gradients as float16 on the wire; not
    ``precision``) and still works, with a warning.
    """
    if "fp16" in values:
        warnings.warn("TrainConfig(fp16=...) is now fp16_compression=... (float16 gradients on the wire)",
                      DeprecationWarning, stacklevel=2)
        values["fp16_compression"] = values.pop("fp16")
    return Config.from_flat(**values)


def check_batch(cfg: Config, layout: Layout) -> int:
    """Check the batch arithmetic against the layout; return rows per accumulation pass.

    Raises:
        BatchError: naming the sizes and a batch size that works.
    """
    o = cfg.optim
    try:
        _check_rows(o.per_pass, layout.num_bundles, cfg.pipeline.microbatches, layout.widths)
    except BatchError as e:
        if o.accumulate == 1:
            raise
        raise BatchError(f"{e} (per accumulation pass; --batch-size is {o.accumulate} passes)") from None
    return o.per_pass
