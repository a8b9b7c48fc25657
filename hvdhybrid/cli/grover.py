"""``hvdtrain grover pretrain|finetune|configs``: GROVER on molecules, task x pipeline x data parallel.

Layout: ``--stages K`` cuts each view's GTransformer stack into K pipeline
stages; ``--task-parallel`` puts the node-view and edge-view chains on
different ranks (2K ranks per bundle). Every stage has one rank; the rest of
the world is bundles, data-parallel through Horovod.
"""

from __future__ import annotations

import os
from dataclasses import asdict, replace
from typing import Any, Callable, Optional

import click
import numpy as np

from ..comm.agreement import agreed, world
from ..errors import USER_ERRORS
from ..layout.topology import LayoutError
from ..models.grover.config import CONFIGS, GroverConfig
from ..parallel.partition import PartitionError
from ..training.data import DataError
from .session import Built, Common, common_options, run_model

__all__ = ["grover"]


@click.group()
def grover() -> None:
    """GROVER (graph transformer on molecules): self-supervised pretraining and finetuning.

    Task parallel (--task-parallel: node-view and edge-view encoders on two
    ranks), pipeline (--stages K), and data parallel (the other ranks form
    bundles). `hvdtrain grover configs` lists the named model sizes.
    """


def _model_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
        click.option("--config", "config_name", type=click.Choice(list(CONFIGS)), default=None,
                     help="Model size (default: small; finetune: the checkpoint's)."),
        click.option("--layers", type=int, default=None,
                     help="GTransformer layers per view (default: the config's); deeper for more stages."),
        click.option("--task-parallel", is_flag=True,
                     help="Node-view and edge-view encoders on two ranks of each bundle."),
        click.option("--optimizer", type=click.Choice(["adam", "sgd"]), default="adam", show_default=True,
                     help="sgd: with momentum 0.9. Adam turns float noise in near-zero gradients into "
                          "full steps, so only SGD runs match across layouts to float tolerance."),
        click.option("--smiles-col", default=None,
                     help="SMILES column: a name or a 0-based index (default: the first column "
                          "named *smiles*, else column 0)."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def _column(spec: Optional[str]) -> str | int | None:
    if spec is None:
        return None
    return int(spec) if spec.strip().lstrip("-").isdigit() else spec.strip()


def grover_widths(c: Common, task_parallel: bool, cfg: GroverConfig) -> tuple[int, ...]:
    """One rank per stage: K stages per chain, two chains with task parallelism."""
    if c.bundle_shape is not None:
        raise LayoutError("GROVER stages have one rank each: use --stages K (and --task-parallel), "
                          "not --bundle-shape")
    k = 1 if c.stages is None else c.stages
    if k < 1:
        raise LayoutError(f"--stages must be >= 1, got {k}")
    if k > cfg.layers:
        raise PartitionError(f"cannot split {cfg.layers} GTransformer layers per view into {k} stages; "
                             f"use --layers {k} or more, or at most --stages {cfg.layers}")
    return (1,) * (k * (2 if task_parallel else 1))


def _config(name: Optional[str], layers: Optional[int], default: GroverConfig) -> GroverConfig:
    cfg = CONFIGS[name] if name else default
    if layers is not None:
        if layers < 1:
            raise PartitionError(f"--layers must be >= 1, got {layers}")
        cfg = replace(cfg, layers=layers)
    return cfg


def describe(name: str, cfg: GroverConfig, n_params: int) -> str:
    return (f"GROVER {name}: hidden {cfg.hidden}, {cfg.heads} heads, {cfg.layers} layers per view, "
            f"{cfg.hops} hops, ffn {cfg.ffn}, dropout {cfg.dropout}: {n_params:,} parameters")


def _say(msg: str) -> None:
    """One line from world rank 0 (setup-phase progress, before the logger is tagged)."""
    if world().Get_rank() == 0:
        click.echo(f"[grover] {msg}", err=True)


def _optimizer(c: Common, name: str) -> Callable[[Any], Any]:
    import torch

    def opt(params: Any) -> torch.optim.Optimizer:
        if name == "sgd":
            return torch.optim.SGD(params, lr=c.lr, momentum=0.9)
        return torch.optim.Adam(params, lr=c.lr)
    return opt


# --------------------------------------------------------------------------- pretrain
@grover.command()
@common_options(default_steps=300, default_batch=32, default_lr=1e-3, default_microbatches=2,
                default_clip=1.0)
@_model_options
@click.option("--data", multiple=True, type=click.Path(),
              help="CSV or .smi file of SMILES; repeat for several (default: RDKit's WEHI PAINS "
                   "test molecules and its first 5K NCI molecules).")
@click.option("--max-molecules", type=int, default=0, show_default=True,
              help="Use only the first N molecules (0: all).")
@click.option("--mask-rate", type=float, default=0.15, show_default=True,
              help="Fraction of atoms and of bonds whose context is masked and predicted.")
@click.option("--val-fraction", type=float, default=0.05, show_default=True,
              help="Molecules held out to report the validation loss.")
def pretrain(c: Common, config_name: Optional[str], layers: Optional[int], task_parallel: bool,
             optimizer: str, smiles_col: Optional[str], data: tuple[str, ...], max_molecules: int,
             mask_rate: float, val_fraction: float) -> None:
    """Self-supervised pretraining: contextual properties of masked atoms and bonds, and motifs.

    Writes OUT/grover.pt (encoder, config, vocabularies) for `grover finetune --checkpoint OUT`.
    """
    from ..models.grover.features import default_pretrain_smiles, random_split, read_smiles_csv

    smiles: list[str] = []
    with agreed(world()):
        cfg = _config(config_name, layers, CONFIGS["small"])
        widths = grover_widths(c, task_parallel, cfg)
        if not 0.0 < mask_rate < 1.0:
            raise DataError(f"--mask-rate must be between 0 and 1, got {mask_rate}")
        if not 0.0 < val_fraction < 0.5:
            raise DataError(f"--val-fraction must be between 0 and 0.5, got {val_fraction}")
        if max_molecules < 0:
            raise DataError(f"--max-molecules must be >= 0, got {max_molecules}")
        if data:
            for path in data:
                t = read_smiles_csv(path, _column(smiles_col))
                if t.skipped:
                    _say(f"{path}: {t.report()}")
                smiles += t.smiles
        else:
            smiles = default_pretrain_smiles()
        if max_molecules:
            smiles = smiles[:max_molecules]
        if len(smiles) < 2:
            raise DataError(f"pretraining needs at least 2 molecules, got {len(smiles)}")
    name = config_name or "small"
    _say(f"{len(smiles)} molecules for pretraining")

    def build(num_stages: int) -> Built:
        import torch
        from rdkit import Chem

        from ..models.grover.data import PretrainSet, build_vocabs, pretrain_loss
        from ..models.grover.features import N_MOTIFS
        from ..models.grover.model import count_parameters
        from ..models.grover.pretrained import FILE, save_pretrained
        from ..models.grover.staged import GroverNet, PretrainHeads, stage_model
        from ..training.trainer import Trainer

        mols = [Chem.MolFromSmiles(s) for s in smiles]
        split = random_split(len(mols), (1.0 - val_fraction, val_fraction, 0.0), seed=0)
        train_mols, val_mols = [mols[i] for i in split[0]], [mols[i] for i in split[1]]
        atom_vocab, bond_vocab = build_vocabs(train_mols)
        _say(f"vocabularies: {len(atom_vocab)} atom contexts, {len(bond_vocab)} bond contexts")
        torch.manual_seed(c.seed)
        net = GroverNet(cfg, PretrainHeads(cfg, len(atom_vocab), len(bond_vocab), N_MOTIFS))
        model = stage_model(net, num_stages // (2 if task_parallel else 1), task_parallel, pretrain_loss)
        train_set = PretrainSet(train_mols, atom_vocab, bond_vocab, mask_rate)
        val_set = PretrainSet(val_mols, atom_vocab, bond_vocab, mask_rate)

        def evaluate(trainer: Trainer, ds: Any) -> dict[str, float]:
            def metric(out: Any, t: Any) -> tuple[float, int]:
                n = int(t.motif.shape[0])
                return float(pretrain_loss(out, t)) * n, n
            loss, rows = trainer.evaluate(ds, metric, 256)
            return {"loss": loss, "rows": rows}

        def finish(trainer: Trainer, out: str) -> None:
            params = trainer.gather_parameters()
            if params is not None:
                save_pretrained(os.path.join(out, FILE), name, cfg, params, atom_vocab.to_json(),
                                bond_vocab.to_json(), trainer.step, len(train_mols))
                trainer.log.info(f"pretrained encoder written to {os.path.join(out, FILE)}; "
                                 f"finetune with: hvdtrain grover finetune --checkpoint {out}")

        return Built(model, train_set, {"val": val_set}, evaluate, _optimizer(c, optimizer),
                     describe(name, cfg, count_parameters(net)), finish)

    run_model("grover-pretrain", c, widths, build)


# --------------------------------------------------------------------------- finetune
def _floats(text: str, what: str, n: int) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise DataError(f"{what} {text!r}: write {n} comma-separated numbers, e.g. 0.8,0.1,0.1") from None
    if len(vals) != n:
        raise DataError(f"{what} {text!r}: write {n} comma-separated numbers, e.g. 0.8,0.1,0.1")
    return vals


def _check_labels(table: Any, path: str, classification: bool) -> None:
    assert table.labels is not None
    for j, name in enumerate(table.label_names):
        col = table.labels[:, j]
        if np.isnan(col).all():
            raise DataError(f"{path}: label column {name!r} is empty in every row; pass a column "
                            "that holds the labels with --label-cols")
        if classification:
            bad = np.flatnonzero(~np.isnan(col) & (col != 0) & (col != 1))
            if bad.size:
                i = int(bad[0])
                raise DataError(f"{path}:{table.lines[i]}: column {name!r} holds {col[i]:g}; classification "
                                "labels are 0 or 1 (empty: missing); use --task regression for values")


def load_labelled(data: Optional[str], label_cols: Optional[str], smiles_col: Optional[str],
                  classification: bool, split: str, split_sizes: str, split_seed: int,
                  ) -> tuple[Any, str, tuple[list[int], list[int], list[int]]]:
    """The labelled molecules (``--data`` or CHEMBL2321810), checked, and their train/val/test split.

    Returns:
        (MolTable, the name to report it by, (train, val, test) row indices).
    """
    from ..models.grover.features import chembl2321810, random_split, read_smiles_csv, scaffold_split

    fractions = _floats(split_sizes, "--split-sizes", 3)
    if data:
        if not label_cols:
            raise DataError("--data needs --label-cols: the label columns, names or 0-based "
                            "indices, comma-separated")
        cols = [_column(x) for x in label_cols.split(",")]
        table = read_smiles_csv(data, _column(smiles_col), [x for x in cols if x is not None])
        path = data
    else:
        if label_cols or smiles_col:
            raise DataError("--label-cols and --smiles-col choose columns of --data; give --data too")
        table, path = chembl2321810(), "CHEMBL2321810"
    if table.skipped:
        _say(f"{path}: {table.report()}")
    _check_labels(table, path, classification)
    parts = (scaffold_split(table.smiles, fractions, split_seed) if split == "scaffold"
             else random_split(len(table), fractions, split_seed))
    for part, idx in zip(("training", "validation", "test"), parts):
        if not idx:
            raise DataError(f"the {split} split of {len(table)} molecules leaves the {part} set "
                            f"empty; use more molecules or other --split-sizes")
    return table, path, parts


def _data_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
        click.option("--data", type=click.Path(), default=None,
                     help="CSV of SMILES with label columns (default: RDKit's CHEMBL2321810 pIC50 set)."),
        click.option("--label-cols", default=None, metavar="COL[,COL..]",
                     help="Label columns: names or 0-based indices (needed with --data)."),
        click.option("--task", type=click.Choice(["regression", "classification"]), default="regression",
                     show_default=True, help="Metric: RMSE (in the labels' units) or mean ROC-AUC."),
        click.option("--split", type=click.Choice(["scaffold", "random"]), default="scaffold",
                     show_default=True),
        click.option("--split-sizes", default="0.8,0.1,0.1", show_default=True, metavar="TRAIN,VAL,TEST"),
        click.option("--split-seed", type=int, default=0, show_default=True),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


@grover.command()
@common_options(default_steps=300, default_batch=32, default_lr=5e-4, default_microbatches=2,
                default_clip=1.0)
@_model_options
@_data_options
@click.option("--checkpoint", type=click.Path(), default=None,
              help="Start from a pretrained encoder: the --out of `grover pretrain`, or its grover.pt.")
@click.option("--disagreement", type=float, default=0.1, show_default=True,
              help="Weight of the loss term that keeps the two heads' predictions together.")
@click.option("--rdkit-2d", "rdkit2d", is_flag=True,
              help="Append RDKit's 2D descriptors (CDF-normalised on the training molecules) to both "
                   "heads' input, as GROVER does at finetuning.")
def finetune(c: Common, config_name: Optional[str], layers: Optional[int], task_parallel: bool,
             optimizer: str, smiles_col: Optional[str], data: Optional[str], label_cols: Optional[str],
             task: str, split: str, split_sizes: str, split_seed: int, checkpoint: Optional[str],
             disagreement: float, rdkit2d: bool) -> None:
    """Finetune on labelled molecules (from scratch, or from --checkpoint); RMSE or ROC-AUC.

    Reports the metric on the validation and test parts of the split, and
    writes OUT/predictions_<part>.csv.
    """
    from ..models.grover.pretrained import check_config, config_from, load_pretrained

    classification = task == "classification"
    state: Optional[dict[str, Any]] = None
    with agreed(world()):
        if checkpoint:
            state = load_pretrained(checkpoint)
            default = config_from(state)
            cfg = _config(config_name, layers, default)
            check_config(state, cfg, checkpoint)
        else:
            cfg = _config(config_name, layers, CONFIGS["small"])
        widths = grover_widths(c, task_parallel, cfg)
        table, path, parts = load_labelled(data, label_cols, smiles_col, classification, split,
                                           split_sizes, split_seed)
    name = config_name or (str(state.get("name", "pretrained")) if state else "small")
    _say(f"{len(table)} molecules with {len(table.label_names)} label(s) from {path}; {split} split "
         f"{len(parts[0])}/{len(parts[1])}/{len(parts[2])}")

    def build(num_stages: int) -> Built:
        import functools

        import torch

        from ..models.grover.data import FinetuneSet, finetune_loss
        from ..models.grover.model import count_parameters
        from ..models.grover.pretrained import load_encoder
        from ..models.grover.staged import FinetuneHeads, GroverNet, stage_model
        from ..training.metrics import rmse, roc_auc
        from ..training.trainer import Trainer

        all_labels = table.labels
        assert all_labels is not None
        tasks = all_labels.shape[1]
        features: Optional[np.ndarray] = None
        if rdkit2d:
            from ..models.grover.features import N_DESCRIPTORS, DescriptorScaler, rdkit_2d

            _say(f"computing {N_DESCRIPTORS} RDKit 2D descriptors for {len(table)} molecules")
            raw = rdkit_2d(table.mols)
            features = DescriptorScaler(raw[parts[0]])(raw)
        torch.manual_seed(c.seed)
        net = GroverNet(cfg, FinetuneHeads(cfg, tasks, 0 if features is None else features.shape[1]))
        note = ""
        if state is not None:
            n = load_encoder(net, state, checkpoint)
            note = (f"; encoder ({n} tensors) from {checkpoint}, pretrained {state['steps']} steps on "
                    f"{state['molecules']} molecules")
        loss_fn = functools.partial(finetune_loss, classification=classification,
                                    disagreement=disagreement)
        model = stage_model(net, num_stages // (2 if task_parallel else 1), task_parallel, loss_fn)

        def subset(idx: list[int], ref: Optional[FinetuneSet] = None) -> FinetuneSet:
            return FinetuneSet([table.mols[i] for i in idx], all_labels[idx],
                               None if ref is None else ref.mean, None if ref is None else ref.std,
                               standardize=not classification,
                               features=None if features is None else features[idx])
        train_set = subset(parts[0])
        sets = {"val": subset(parts[1], train_set), "test": subset(parts[2], train_set)}
        smiles_of = {id(sets["val"]): [table.smiles[i] for i in parts[1]],
                     id(sets["test"]): [table.smiles[i] for i in parts[2]]}
        part_of = {id(d): k for k, d in sets.items()}

        def rows(out: Any) -> torch.Tensor:
            pa, pb = out
            both: torch.Tensor = (torch.sigmoid(pa) + torch.sigmoid(pb)) if classification else pa + pb
            return both / 2

        def evaluate(trainer: Trainer, ds: FinetuneSet) -> dict[str, float]:
            pred = trainer.predict(ds, 256, rows)
            result: Optional[dict[str, float]] = None
            if pred is not None:
                p = pred.double().numpy() * ds.std + ds.mean
                value = roc_auc(p, ds.raw) if classification else rmse(p, ds.raw)
                result = {"roc_auc" if classification else "rmse": value, "rows": float(len(ds))}
                if trainer.cfg.out:
                    _write_predictions(os.path.join(trainer.cfg.out, f"predictions_{part_of[id(ds)]}.csv"),
                                       smiles_of[id(ds)], table.label_names, ds.raw, p)
            got: dict[str, float] = trainer.groups.world.bcast(result, root=0)
            return got

        if features is not None:
            note += f"; heads also read {features.shape[1]} RDKit 2D descriptors"
        return Built(model, train_set, sets, evaluate, _optimizer(c, optimizer),
                     describe(name, cfg, count_parameters(net)) + note)

    run_model("grover-finetune", c, widths, build)


def _write_predictions(path: str, smiles: list[str], names: list[str], y: np.ndarray, p: np.ndarray) -> None:
    import csv

    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["smiles", *names, *(f"predicted_{n}" for n in names)])
        for i, s in enumerate(smiles):
            out.writerow([s, *("" if np.isnan(v) else f"{v:.6g}" for v in y[i]),
                          *(f"{v:.6g}" for v in p[i])])


# --------------------------------------------------------------------------- baseline
@grover.command()
@click.option("--smiles-col", default=None, help="SMILES column: a name or a 0-based index.")
@_data_options
@click.option("--trees", type=int, default=500, show_default=True)
@click.option("--radius", type=int, default=2, show_default=True, help="Morgan fingerprint radius.")
@click.option("--bits", type=int, default=2048, show_default=True, help="Fingerprint length.")
@click.option("--seed", type=int, default=0, show_default=True)
def baseline(smiles_col: Optional[str], data: Optional[str], label_cols: Optional[str], task: str,
             split: str, split_sizes: str, split_seed: int, trees: int, radius: int, bits: int,
             seed: int) -> None:
    """Reference: a random forest on Morgan fingerprints, same data, split and metric as finetune.

    One process (no MPI needed); prints the validation and test metric as JSON.
    """
    import json

    from ..errors import UserError
    from ..models.grover.baseline import fingerprints, forest_predict
    from ..training.metrics import rmse, roc_auc

    classification = task == "classification"
    try:
        if trees < 1 or radius < 0 or bits < 8:
            raise DataError(f"--trees must be >= 1, --radius >= 0 and --bits >= 8; got {trees}, "
                            f"{radius}, {bits}")
        table, path, parts = load_labelled(data, label_cols, smiles_col, classification, split,
                                           split_sizes, split_seed)
    except USER_ERRORS as e:
        raise UserError(str(e)) from None
    assert table.labels is not None
    x = fingerprints(table.mols, radius, bits)
    y = table.labels.astype(np.float64)
    train, val, test = parts
    result: dict[str, Any] = {"model": "random-forest-morgan", "data": path, "split": split,
                              "sizes": [len(p) for p in parts], "trees": trees, "radius": radius,
                              "bits": bits, "seed": seed}
    metric = roc_auc if classification else rmse
    key = "roc_auc" if classification else "rmse"
    pred = forest_predict(x[train], y[train], x[val + test], classification, trees, seed)
    result[f"val_{key}"] = metric(pred[:len(val)], y[val])
    result[f"test_{key}"] = metric(pred[len(val):], y[test])
    if not classification:  # the floor any model must beat: predict the training molecules' mean
        mean = np.nanmean(y[train], axis=0, keepdims=True)
        result["train_mean_val_rmse"] = rmse(np.repeat(mean, len(val), 0), y[val])
        result["train_mean_test_rmse"] = rmse(np.repeat(mean, len(test), 0), y[test])
    click.echo(json.dumps(result))


# --------------------------------------------------------------------------- configs
@grover.command()
@click.option("--tasks", type=int, default=1, show_default=True, help="Finetuning outputs per head.")
def configs(tasks: int) -> None:
    """The named model sizes and their parameter counts (with finetuning heads)."""
    import torch

    from ..errors import UserError

    if tasks < 1:
        raise UserError(f"--tasks must be >= 1, got {tasks}")
    from ..models.grover.model import count_parameters
    from ..models.grover.staged import FinetuneHeads, GroverNet

    click.echo(f"{'config':<7} {'hidden':>6} {'heads':>5} {'layers':>6} {'hops':>4} {'ffn':>5} "
               f"{'dropout':>7} {'parameters':>12}")
    for name, cfg in CONFIGS.items():
        with torch.device("meta"):  # shapes only: no memory, no time
            n = count_parameters(GroverNet(cfg, FinetuneHeads(cfg, tasks)))
        d = asdict(cfg)
        click.echo(f"{name:<7} {d['hidden']:>6} {d['heads']:>5} {d['layers']:>6} {d['hops']:>4} "
                   f"{d['ffn']:>5} {d['dropout']:>7} {n:>12,}")
