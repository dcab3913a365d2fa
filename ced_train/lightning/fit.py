"""Fit a `TaggerModule`, then export the weights to use for inference as one self-describing file, and reuse such a
file when it was made from the same inputs (its fingerprint).

An exported model is `{"ced_model": {**describe_model(...), "state_dict"}, "ced_provenance": {...}}`:
`ced_train.models.load_checkpoint` reads it like any checkpoint; `ced_provenance` holds the fingerprint, the
averaged checkpoints and the best validation score.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import WandbLogger

from ced_train.lightning.callbacks import AverageBestCheckpoints
from ced_train.lightning.module import TaggerModule
from ced_train.models import describe_model

log = logging.getLogger(__name__)
LAST_CHECKPOINT = "last.ckpt"


class StageOutputError(RuntimeError):
    """An output that exists but was made from other inputs, or leftovers of an unfinished run."""


def read_provenance(path: str | Path) -> dict | None:
    """The `ced_provenance` of an exported model, or None when `path` does not exist."""
    path = Path(path)
    if not path.is_file():
        return None
    payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return dict(payload.get("ced_provenance") or {})


def reusable(path: str | Path, fingerprint: str, overwrite: bool, option: str) -> dict | None:
    """The provenance of `path` when it was made from `fingerprint` (reuse it); None when it must be (re)made.

    Raises:
        StageOutputError: `path` was made from something else and `overwrite` is off; names both fingerprints
            and the option (`option`, e.g. "distill.overwrite") that allows replacing it.
    """
    provenance = read_provenance(path)
    if provenance is None:
        return None
    if provenance.get("fingerprint") == fingerprint:
        return provenance
    if overwrite:
        log.info("%s was made from other inputs (fingerprint %s); %s=true: replacing it",
                 path, provenance.get("fingerprint"), option)
        return None
    raise StageOutputError(
        f"{path} exists and was made from other inputs or settings (fingerprint {provenance.get('fingerprint')}, "
        f"this run {fingerprint}); set {option}=true to replace it, or choose another output directory"
    )


def resolve_resume(resume: str | None, checkpoint_dir: Path, overwrite: bool, option_prefix: str) -> str | None:
    """The checkpoint to continue from: `resume` is None (start afresh), "auto" (`last.ckpt` of `checkpoint_dir` if
    any) or a path. Starting afresh over an unfinished run's checkpoints needs `overwrite`, which deletes them."""
    last = checkpoint_dir / LAST_CHECKPOINT
    if resume == "auto":
        return str(last) if last.is_file() else None
    if resume:
        if not Path(resume).is_file():
            raise FileNotFoundError(f"{option_prefix}.resume={resume}: no such checkpoint")
        return str(resume)
    if checkpoint_dir.is_dir() and any(checkpoint_dir.iterdir()):
        if not overwrite:
            raise StageOutputError(
                f"{checkpoint_dir} holds checkpoints of an unfinished run: continue it with {option_prefix}.resume=auto, "
                f"or set {option_prefix}.overwrite=true to start again"
            )
        if pl.utilities.rank_zero_only.rank == 0:
            shutil.rmtree(checkpoint_dir)
    return None


def export_model(path: Path, module: TaggerModule, provenance: dict) -> None:
    """Write the module's network (the weights to use for inference) and `provenance` to `path`, atomically."""
    payload = {
        "ced_model": {
            **describe_model(module.model, module.model_name),
            "state_dict": {key: value.detach().cpu() for key, value in module.model.state_dict().items()},
        },
        "ced_provenance": provenance,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def fit_and_export(
    trainer: pl.Trainer,
    module: TaggerModule,
    datamodule: pl.LightningDataModule,
    out_path: Path,
    fingerprint: str,
    resume_from: str | None = None,
) -> dict:
    """Train, then export the final weights (the average of the best checkpoints when `AverageBestCheckpoints` is
    among the callbacks, EMA weights with `EMAWeightAveraging`) to `out_path`. Returns the run's summary."""
    start = time.perf_counter()
    if resume_from:
        log.info("resuming from %s", resume_from)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
    finally:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and trainer.is_global_zero:
                logger.experiment.finish()  # so that the next run in this process starts its own wandb run
    averaged = next((cb.sources for cb in trainer.callbacks if isinstance(cb, AverageBestCheckpoints)), [])
    checkpoint = trainer.checkpoint_callback
    best = checkpoint.best_model_score if checkpoint is not None else None
    summary = {
        "fingerprint": fingerprint,
        "checkpoint": str(out_path),
        "best_val_mAP": float(best) if best is not None else None,
        "averaged_checkpoints": [{"path": path, "val_mAP": score} for path, score in averaged],
        "val_history": module.val_history,
        "epochs": trainer.current_epoch,
        "steps": trainer.global_step,
        "train_seconds": time.perf_counter() - start,
        "resumed_from": resume_from,
    }
    if trainer.is_global_zero:
        export_model(out_path, module, summary)
        log.info("exported %s (best val/mAP %s)", out_path, summary["best_val_mAP"])
    trainer.strategy.barrier("export_model")
    return summary
