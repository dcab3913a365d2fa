"""Stage `distill`: a label-free student trained on the teacher store.

Epoch e reads view `e mod V` of every clip with its stored augmentation (`distill.views=replay`) and the teachers'
top-k of that very view; `fresh` draws fresh views against the same targets (the paper's ablation), `reference` the
reference implementation's (no shift, fresh masks, stored mixup). Exports `distill.out_dir/student.ckpt`; an export
whose fingerprint matches this run's inputs is reused.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from ced_train.data import read_manifest
from ced_train.lightning.data import ViewsDataModule
from ced_train.lightning.fit import fit_and_export, resolve_resume, reusable
from ced_train.lightning.module import TaggerModule
from ced_train.models import init_from_checkpoint
from ced_train.stages import build_trainer, fingerprint, training_identity
from ced_train.store import StoreError, TeacherStore

log = logging.getLogger(__name__)


# A class the teachers never rank in their top-k starts at this probability, not at 0 (a logit of -inf).
PRIOR_FLOOR = 1e-4


def head_prior(option: float | str | None, store_path: Path) -> float | torch.Tensor | None:
    """`distill.head_bias_prior`: "store" → `(classes,)` the store's mean teacher probability per class, clipped
    to [PRIOR_FLOOR, 1 - PRIOR_FLOOR]; a probability or None as given."""
    if option != "store":
        if isinstance(option, str):
            raise ValueError(f"distill.head_bias_prior={option!r}: expected store, a probability in (0, 1) or null")
        return option
    with TeacherStore(store_path) as store:
        means = store.mean_probabilities()
    prior = torch.from_numpy(means).clamp(PRIOR_FLOOR, 1 - PRIOR_FLOOR)
    log.info("distill: head bias from the store's mean teacher probabilities (%d of %d classes above %g, "
             "largest %.3f)", int((means > PRIOR_FLOOR).sum()), len(means), PRIOR_FLOOR, means.max())
    return prior


def run(cfg: DictConfig) -> dict:
    stage = cfg.distill
    store_path = Path(cfg.store.path)
    if not store_path.is_file():
        raise StoreError(f"no teacher store at store.path={store_path}: run stage teach first (stages=[teach,distill]), "
                         "or import the paper's released outputs there (python -m ced_train.store import-official)")
    spec = TeacherStore(store_path).spec
    train_manifest = read_manifest(cfg.data.train_shards)
    val_manifest = read_manifest(cfg.data.val_shards)
    if spec.manifest_fingerprint != train_manifest.fingerprint:
        raise StoreError(
            f"store {store_path} was made from shards with fingerprint {spec.manifest_fingerprint}, but "
            f"data.train_shards={cfg.data.train_shards} has {train_manifest.fingerprint}"
        )
    if spec.num_classes != val_manifest.num_classes:
        raise ValueError(f"the teachers have {spec.num_classes} classes, data.val_shards {val_manifest.num_classes}")
    out_path = Path(stage.out_dir) / "student.ckpt"
    student_fingerprint = fingerprint({
        "stage": "distill", "seed": cfg.seed, "training": training_identity(cfg, stage),
        "store": spec.fingerprint(), "val_shards": val_manifest.fingerprint,
    })
    reused = reusable(out_path, student_fingerprint, stage.overwrite, "distill.overwrite")
    if reused is not None:
        log.info("distill: reusing %s (fingerprint %s, best val/mAP %s)", out_path, student_fingerprint,
                 reused.get("best_val_mAP"))
        return {**reused, "reused": True}

    pl.seed_everything(cfg.seed, workers=True)
    model = instantiate(stage.model, num_classes=spec.num_classes)
    init = init_from_checkpoint(model, stage.init_checkpoint, cfg.trust_checkpoints) if stage.init_checkpoint else None
    prior = None if init is not None and init.head_loaded else head_prior(stage.head_bias_prior, store_path)
    module = TaggerModule(
        model,
        model_name=stage.model.name,
        loss=instantiate(stage.loss),
        optimizer=instantiate(stage.optim.optimizer),
        scheduler=instantiate(stage.optim.scheduler),
        seed=cfg.seed,
        compile=stage.compile,
        head_bias_prior=prior,
    )
    datamodule = ViewsDataModule(
        train_shards=cfg.data.train_shards,
        val_shards=cfg.data.val_shards,
        batch_size=cfg.data.batch_size,
        eval_batch_size=cfg.data.eval_batch_size,
        num_workers=cfg.data.num_workers,
        seed=cfg.seed,
        store=str(store_path),
        views=stage.views,
        fresh_seed=stage.fresh_seed,
    )
    work_dir = out_path.parent / "student"
    resume_from = resolve_resume(stage.resume, work_dir / "checkpoints", stage.overwrite, "distill")
    trainer = build_trainer(cfg, stage.trainer, work_dir, run_name=f"{cfg.name}-distill")
    log.info("distill: %s on %d clips x %d views of %s (%s)", stage.model.name, train_manifest.num_samples,
             spec.num_views, store_path, f"distill.views={stage.views}, stored targets")
    summary = fit_and_export(trainer, module, datamodule, out_path, student_fingerprint, resume_from)
    return {**summary, "store": str(store_path), "views": stage.views, "init": str(init) if init else None,
            "reused": False}
