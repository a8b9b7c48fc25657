"""``hvdtrain grover pretrain`` and ``grover finetune``: GROVER trained at task x pipeline x data layouts."""

from __future__ import annotations

import os
from typing import Any, Optional

import click
import numpy as np

from ..comm.agreement import agreed, world
from ..config import Config
from ..models.grover.config import CONFIGS
from ..models.grover.labels import column, load_labelled, write_predictions
from ..training.data import DataError
from .grover_options import (
    corpus_options,
    corpus_source,
    data_options,
    describe,
    grover_config,
    grover_widths,
    make_optimizer,
    model_options,
    say,
    workers_for,
)
from .options import config_options
from .session import Built, run_model

__all__ = ["finetune", "pretrain"]


# --------------------------------------------------------------------------- pretrain
@click.command()
@config_options(steps=300, batch_size=32, lr=1e-3, microbatches=2, clip_grad=1.0)
@model_options
@corpus_options
@click.option("--mask-rate", type=float, default=0.15, show_default=True,
              help="Fraction of atoms and of bonds whose context is masked and predicted.")
@click.option("--val-fraction", type=float, default=0.05, show_default=True,
              help="Molecules held out (the corpus's first, at most 2,000) for the validation loss.")
def pretrain(run: Config, config_name: Optional[str], layers: Optional[int], task_parallel: bool,
             optimizer: str, smiles_col: Optional[str], corpus: Optional[str], data: tuple[str, ...],
             max_molecules: int, workers_spec: str, corpus_cache: Optional[str], mask_rate: float,
             val_fraction: float) -> None:
    """Self-supervised pretraining: contextual properties of masked atoms and bonds, and motifs.

    The corpus streams: molecules are read and featurised as training goes, by
    --workers processes per rank, each rank only its rows. Writes OUT/grover.pt
    (encoder, config, vocabularies) for `grover finetune --checkpoint OUT`.
    """
    from ..models.grover.corpus import CorpusIndex, held_out, index_corpus, index_path
    from ..models.grover.workers import Workers
    from ..training.device import local_rank

    w = world()
    with agreed(w):
        cfg = grover_config(config_name, layers, CONFIGS["small"])
        widths = grover_widths(run.parallel, task_parallel, cfg)
        if not 0.0 < mask_rate < 1.0:
            raise DataError(f"--mask-rate must be between 0 and 1, got {mask_rate}")
        if not 0.0 < val_fraction < 0.5:
            raise DataError(f"--val-fraction must be between 0 and 0.5, got {val_fraction}")
        workers = workers_for(workers_spec)
        source = corpus_source(corpus, data, column(smiles_col), max_molecules)
        if local_rank() == 0:  # one per host: the cache need not be on a shared file system
            pool = Workers(workers)
            try:
                index_corpus(source, pool, corpus_cache, max_molecules, say=say)
            finally:
                pool.close()
    with agreed(w):  # after the others' index is there (the agreement above waited for them)
        index = CorpusIndex(index_path(source, corpus_cache, max_molecules))
        val_smiles = held_out(index, min(2000, max(1, round(val_fraction * index.n))))
    n_train = index.n - len(val_smiles)
    name = config_name or "small"
    say(f"{n_train:,} molecules of {source.name} for pretraining, {len(val_smiles):,} held out; "
        f"{workers} featurising worker(s) per rank")

    def build(num_stages: int, layout: Any) -> Built:
        import torch
        from rdkit import Chem
        from rdkit.rdBase import BlockLogs

        from ..models.grover.data import PretrainSet, pretrain_loss
        from ..models.grover.features import N_MOTIFS, Vocab
        from ..models.grover.model import count_parameters
        from ..models.grover.pretrained import FILE, save_pretrained
        from ..models.grover.staged import GroverNet, PretrainHeads, stage_model
        from ..models.grover.stream import StreamedPretrainSet
        from ..training.trainer import Trainer

        atom_vocab, bond_vocab = (Vocab.from_json(v) for v in index.vocabs)
        say(f"vocabularies: {len(atom_vocab)} atom contexts, {len(bond_vocab)} bond contexts")
        torch.manual_seed(run.run.seed)
        net = GroverNet(cfg, PretrainHeads(cfg, len(atom_vocab), len(bond_vocab), N_MOTIFS))
        model = stage_model(net, num_stages // (2 if task_parallel else 1), task_parallel, pretrain_loss)
        train_set = StreamedPretrainSet(index, n_train, mask_rate, Workers(workers, index.vocabs),
                                        first=len(val_smiles))
        with BlockLogs():
            val_mols = [m for m in (Chem.MolFromSmiles(s) for s in val_smiles)
                        if m is not None and m.GetNumAtoms()]
        val_set = PretrainSet(val_mols, atom_vocab, bond_vocab, mask_rate)

        def evaluate(trainer: Trainer, ds: Any) -> dict[str, float]:
            def metric(out: Any, t: Any) -> tuple[float, int]:
                n = int(t.motif.shape[0])
                return float(pretrain_loss(out, t)) * n, n
            loss, rows = trainer.evaluate(ds, metric, 64)  # attention's padded scores grow with it
            return {"loss": loss, "rows": rows}

        def finish(trainer: Trainer, out: str) -> None:
            if train_set.molecules:
                rss = train_set.workers.peak_rss()
                trainer.log.info(f"this rank featurised {train_set.molecules:,} molecules "
                                 f"({train_set.skipped:,} did not parse: they stood in with no weight), "
                                 f"{train_set.progress()}, and waited {train_set.wait_s:.1f} s for them"
                                 + (f"; its workers' peak RSS {rss / 1e6:.1f} MB" if rss else ""))
            train_set.close()
            params = trainer.gather_parameters()
            if params is not None:
                save_pretrained(os.path.join(out, FILE), name, cfg, params, atom_vocab.to_json(),
                                bond_vocab.to_json(), trainer.step, n_train)
                trainer.log.info(f"pretrained encoder written to {os.path.join(out, FILE)}; "
                                 f"finetune with: hvdtrain grover finetune --checkpoint {out}")

        return Built(model, train_set, {"val": val_set}, evaluate, make_optimizer(run.optim.lr, optimizer),
                     describe(name, cfg, count_parameters(net)), finish, helpers=workers)

    run_model("grover-pretrain", run, widths, build, widths=widths)



@click.command()
@config_options(steps=300, batch_size=32, lr=5e-4, microbatches=2, clip_grad=1.0)
@model_options
@data_options
@click.option("--checkpoint", type=click.Path(), default=None,
              help="Start from a pretrained encoder: the --out of `grover pretrain`, or its grover.pt.")
@click.option("--disagreement", type=float, default=0.1, show_default=True,
              help="Weight of the loss term that keeps the two heads' predictions together.")
@click.option("--freeze-encoder", is_flag=True,
              help="Train only the readout and heads; the encoder (from --checkpoint) stays as it is.")
@click.option("--rdkit-2d", "rdkit2d", is_flag=True,
              help="Append RDKit's 2D descriptors (CDF-normalised on the training molecules) to both "
                   "heads' input, as GROVER does at finetuning.")
def finetune(run: Config, config_name: Optional[str], layers: Optional[int], task_parallel: bool,
             optimizer: str, smiles_col: Optional[str], data: Optional[str], label_cols: Optional[str],
             task: str, split: str, split_sizes: str, split_seed: int, checkpoint: Optional[str],
             disagreement: float, freeze_encoder: bool, rdkit2d: bool) -> None:
    """Finetune on labelled molecules (from scratch, or from --checkpoint); RMSE or ROC-AUC.

    Reports the metric on the validation and test parts of the split, and
    writes OUT/predictions_<part>.csv.
    """
    from ..models.grover.pretrained import check_config, config_from, load_pretrained

    classification = task == "classification"
    state: Optional[dict[str, Any]] = None
    with agreed(world()):
        if freeze_encoder and not checkpoint:
            raise DataError("--freeze-encoder keeps a pretrained encoder as it is: give --checkpoint too")
        if checkpoint:
            state = load_pretrained(checkpoint)
            default = config_from(state)
            cfg = grover_config(config_name, layers, default)
            check_config(state, cfg, checkpoint)
        else:
            cfg = grover_config(config_name, layers, CONFIGS["small"])
        widths = grover_widths(run.parallel, task_parallel, cfg)
        table, path, parts = load_labelled(data, label_cols, smiles_col, classification, split,
                                           split_sizes, split_seed, say)
    name = config_name or (str(state.get("name", "pretrained")) if state else "small")
    say(f"{len(table)} molecules with {len(table.label_names)} label(s) from {path}; {split} split "
         f"{len(parts[0])}/{len(parts[1])}/{len(parts[2])}")

    def build(num_stages: int, layout: Any) -> Built:
        import functools

        import torch

        from ..models.grover.data import FinetuneSet, finetune_loss
        from ..models.grover.model import count_parameters
        from ..models.grover.pretrained import freeze, load_encoder
        from ..models.grover.staged import FinetuneHeads, GroverNet, stage_model
        from ..training.metrics import rmse, roc_auc
        from ..training.trainer import Trainer

        all_labels = table.labels
        assert all_labels is not None
        tasks = all_labels.shape[1]
        features: Optional[np.ndarray] = None
        if rdkit2d:
            from ..models.grover.features import N_DESCRIPTORS, DescriptorScaler, rdkit_2d

            say(f"computing {N_DESCRIPTORS} RDKit 2D descriptors for {len(table)} molecules")
            raw = rdkit_2d(table.mols)
            features = DescriptorScaler(raw[parts[0]])(raw)
        torch.manual_seed(run.run.seed)
        net = GroverNet(cfg, FinetuneHeads(cfg, tasks, 0 if features is None else features.shape[1]))
        note = ""
        if state is not None:
            n = load_encoder(net, state, checkpoint)
            note = (f"; encoder ({n} tensors) from {checkpoint}, pretrained {state['steps']} steps on "
                    f"{state['molecules']} molecules")
            if freeze_encoder:
                note += f", frozen ({freeze(net):,} parameters not trained)"
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
                if trainer.cfg.run.out:
                    write_predictions(os.path.join(trainer.cfg.run.out, f"predictions_{part_of[id(ds)]}.csv"),
                                       smiles_of[id(ds)], table.label_names, ds.raw, p)
            got: dict[str, float] = trainer.groups.world.bcast(result, root=0)
            return got

        if features is not None:
            note += f"; heads also read {features.shape[1]} RDKit 2D descriptors"
        return Built(model, train_set, sets, evaluate, make_optimizer(run.optim.lr, optimizer),
                     describe(name, cfg, count_parameters(net)) + note)

    run_model("grover-finetune", run, widths, build, widths=widths)


