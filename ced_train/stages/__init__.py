"""The stages of `python -m ced_train`: each module `ced_train/stages/<name>.py` has `run(cfg) -> dict` and talks to
the others only through files. This package holds what the stages' tops share: fingerprints, the rank check, the
autocast dtype of the inference stages, and the instantiation of a Trainer with its callbacks and loggers.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

# Trainer arguments that change how a run is shown, not what it computes: left out of fingerprints.
_DISPLAY_ONLY = ("enable_progress_bar", "enable_model_summary", "log_every_n_steps")


PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def autocast_dtype(option: str, precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `precision` (bf16, fp16, fp32 = none, or auto: bf16 on a GPU, none on a CPU) on
    `device`; the CPU runs bf16 and fp16 as asked. `option` names the setting in the error."""
    check_precision(option, precision)
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return PRECISIONS[precision]


def check_precision(option: str, precision: str) -> None:
    if precision != "auto" and precision not in PRECISIONS:
        raise ValueError(f"{option}={precision!r}: expected auto or one of {', '.join(PRECISIONS)}")


def fingerprint(payload: dict) -> str:
    """16 hex digits of sha256 over canonical JSON of `payload` (config nodes are resolved first)."""
    def plain(value):
        if isinstance(value, DictConfig) or OmegaConf.is_list(value):
            return OmegaConf.to_container(value, resolve=True)
        return value

    text = json.dumps({key: plain(value) for key, value in payload.items()}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def training_identity(cfg: DictConfig, stage: DictConfig) -> dict:
    """What a training run's result depends on besides its data: the stage node (network, loss, optimiser,
    schedule), batch size, trainer and callbacks; not where outputs go or whether to overwrite or resume."""
    stage_node = {k: v for k, v in OmegaConf.to_container(stage, resolve=True).items()
                  if k not in ("out_dir", "overwrite", "resume")}
    trainer = {k: v for k, v in OmegaConf.to_container(cfg.trainer, resolve=True).items() if k not in _DISPLAY_ONLY}
    callbacks = {name: node for name, node in OmegaConf.to_container(cfg.callbacks, resolve=True).items()
                 if name not in ("progress_bar", "lr_monitor", "last_checkpoint")}
    return {"stage": stage_node, "batch_size": cfg.data.batch_size, "trainer": trainer, "callbacks": callbacks}


def is_global_zero() -> bool:
    """True in the process of global rank 0 (Lightning's view of RANK / LOCAL_RANK / SLURM_PROCID)."""
    return rank_zero_only.rank == 0


def native_bf16(accelerator: str) -> bool:
    """Whether the training device computes bf16 natively: a CUDA GPU that supports it, or a CPU with AVX512-BF16
    or AMX (elsewhere CPU bf16 is emulated and slower than float32)."""
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    # torch.cpu's feature probes are private; a release without them counts as no native bf16.
    probes = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(probe() for probe in probes if probe is not None)


def training_precision(precision: str, accelerator: str) -> str:
    """Lightning's `precision` of a training run: "auto" is bf16-mixed where the device computes bf16 natively
    (`native_bf16`), 32-true elsewhere; any other value as given."""
    if precision != "auto":
        return precision
    return "bf16-mixed" if native_bf16(accelerator) else "32-true"


def build_trainer(cfg: DictConfig, schedule: DictConfig, root_dir: Path, run_name: str) -> pl.Trainer:
    """The Trainer of one training run: `cfg.trainer` plus the stage's `schedule` (max_epochs, validation cadence,
    any Trainer argument, which wins), fresh callbacks (checkpoints under `root_dir/checkpoints`) and loggers named
    `run_name`; precision "auto" resolved by `training_precision`."""
    callbacks = []
    for name, node in (cfg.callbacks or {}).items():
        if name in ("model_checkpoint", "last_checkpoint"):
            callbacks.append(instantiate(node, dirpath=str(root_dir / "checkpoints")))
        else:
            callbacks.append(instantiate(node))
    loggers = [instantiate(node, name=run_name) for node in (cfg.logger or {}).values()]
    arguments = {**OmegaConf.to_container(cfg.trainer, resolve=True), **OmegaConf.to_container(schedule, resolve=True)}
    arguments["precision"] = training_precision(str(arguments.get("precision", "32-true")),
                                                str(arguments.get("accelerator", "auto")))
    return instantiate(
        arguments,
        callbacks=callbacks,
        logger=loggers or False,
        default_root_dir=str(root_dir),
    )
