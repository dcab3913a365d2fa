"""Stage `train`: supervised training on labels with fresh augmentation (teachers, baselines).

Trains `train.members` networks (seeds `seed`, `seed + 1`, ...) and exports each to `train.out_dir/member<i>.ckpt`.
An export whose fingerprint matches this run's inputs is reused, and the log says so.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
from hydra.utils import instantiate
from omegaconf import DictConfig

from ced_train.augment import AugmentConfig
from ced_train.data import read_manifest
from ced_train.lightning.data import ViewsDataModule
from ced_train.lightning.fit import fit_and_export, resolve_resume, reusable
from ced_train.lightning.module import TaggerModule
from ced_train.models import init_from_checkpoint
from ced_train.stages import build_trainer, fingerprint, training_identity

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    stage = cfg.train
    augment: AugmentConfig = instantiate(stage.augment)
    train_manifest = read_manifest(cfg.data.train_shards)
    val_manifest = read_manifest(cfg.data.val_shards)
    if not train_manifest.labelled:
        raise ValueError(f"data.train_shards={cfg.data.train_shards} holds no labels: supervised training needs them")
    out_dir = Path(stage.out_dir)
    members = []
    for member in range(stage.members):
        seed = cfg.seed + member
        name = f"member{member}"
        out_path = out_dir / f"{name}.ckpt"
        member_fingerprint = fingerprint({
            "stage": "train", "seed": seed, "training": training_identity(cfg, stage),
            "train_shards": train_manifest.fingerprint, "val_shards": val_manifest.fingerprint,
        })
        reused = reusable(out_path, member_fingerprint, stage.overwrite, "train.overwrite")
        if reused is not None:
            log.info("train: reusing %s (fingerprint %s, best val/mAP %s)", out_path, member_fingerprint,
                     reused.get("best_val_mAP"))
            members.append({**reused, "reused": True})
            continue

        pl.seed_everything(seed, workers=True)
        model = instantiate(stage.model, num_classes=train_manifest.num_classes)
        init = init_from_checkpoint(model, stage.init_checkpoint, cfg.trust_checkpoints) if stage.init_checkpoint else None
        module = TaggerModule(
            model,
            model_name=stage.model.name,
            loss=instantiate(stage.loss),
            optimizer=instantiate(stage.optim.optimizer),
            scheduler=instantiate(stage.optim.scheduler),
            seed=seed,
            compile=stage.compile,
            head_bias_prior=None if init is not None and init.head_loaded else stage.head_bias_prior,
        )
        datamodule = ViewsDataModule(
            train_shards=cfg.data.train_shards,
            val_shards=cfg.data.val_shards,
            batch_size=cfg.data.batch_size,
            eval_batch_size=cfg.data.eval_batch_size,
            num_workers=cfg.data.num_workers,
            seed=seed,
            augment=augment,
            fresh_seed=seed,
        )
        work_dir = out_dir / name
        resume_from = resolve_resume(stage.resume, work_dir / "checkpoints", stage.overwrite, "train")
        trainer = build_trainer(cfg, stage.trainer, work_dir, run_name=f"{cfg.name}-train-{name}")
        log.info("train: %s (%s, seed %d) on %d clips of %s", name, stage.model.name, seed,
                 train_manifest.num_samples, cfg.data.train_shards)
        members.append({**fit_and_export(trainer, module, datamodule, out_path, member_fingerprint, resume_from),
                        "init": str(init) if init else None, "reused": False})
    return {"members": members}
