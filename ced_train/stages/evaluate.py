"""Stage `evaluate`: mAP, mAUC and d-prime of systems (one checkpoint, or several averaged in probability space)
on labelled shards, full-length clips chunked as the model does; per-class AP tables as CSV with display names. A
linear probe on log-mel statistics fitted on `evaluate.baseline_shards` (ced_train/baseline.py) is scored beside them
as the system `baseline_logreg`, the floor a network has to clear.

Runs in the process of global rank 0 only (other ranks of a multi-process run return at once), which reads every clip
itself, whatever the world size of the run around it, and checks that it scored as many clips as the manifest holds.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from tqdm import tqdm

from ced_train.baseline import C, FEATURES, LinearProbe, clip_features, fit_probe, shard_features
from ced_train.data import ClipStream, Manifest, collate_clips, read_manifest
from ced_train.lightning.module import clip_probabilities
from ced_train.metrics import tagging_metrics, write_per_class_csv
from ced_train.models import load_checkpoint
from ced_train.models.frontend import LogMelFrontEnd
from ced_train.stages import autocast_dtype, is_global_zero
from ced_train.transfer import copies_async, pins_memory

log = logging.getLogger(__name__)

BASELINE = "baseline_logreg"


def systems_of(cfg: DictConfig) -> dict[str, list[str]]:
    """`evaluate.systems` (name → checkpoint or list of checkpoints) plus `evaluate.checkpoint` named after its file.
    A system of no checkpoints (`teachers` of a run on imported teacher outputs) is left out, and logged."""
    systems = {name: [paths] if isinstance(paths, str) else list(paths)
               for name, paths in OmegaConf.to_container(cfg.evaluate.systems, resolve=True).items()}
    for name in [name for name, paths in systems.items() if not paths]:
        log.info("evaluate: system %s has no checkpoints: left out", name)
        del systems[name]
    if cfg.evaluate.checkpoint:
        systems[Path(cfg.evaluate.checkpoint).stem] = [str(cfg.evaluate.checkpoint)]
    if not systems:
        raise ValueError("nothing to evaluate: set evaluate.checkpoint=PATH or evaluate.systems.<name>=[PATHS]")
    return systems


def run(cfg: DictConfig) -> dict:
    if not is_global_zero():
        return {}
    stage = cfg.evaluate
    systems = systems_of(cfg)
    if stage.baseline_shards and BASELINE in systems:
        raise ValueError(f"evaluate.systems.{BASELINE} takes the baseline's name: rename the system or set "
                         "evaluate.baseline_shards=null")
    manifest = read_manifest(stage.shards)
    if not manifest.labelled:
        raise ValueError(f"evaluate.shards={stage.shards} holds no labels")
    device = torch.device("cuda" if stage.device == "auto" and torch.cuda.is_available() else
                          "cpu" if stage.device == "auto" else stage.device)
    dtype = autocast_dtype("evaluate.precision", stage.precision, device)
    checkpoints = sorted({path for paths in systems.values() for path in paths})
    models = {path: load_checkpoint(path, trust=cfg.trust_checkpoints).to(device) for path in checkpoints}
    for path, model in models.items():
        if model.num_classes != manifest.num_classes:
            raise ValueError(f"{path} has {model.num_classes} outputs, evaluate.shards={stage.shards} "
                             f"{manifest.num_classes} classes")
    frontend = LogMelFrontEnd().to(device)
    probe, fitted_on = fit_baseline(stage, manifest, frontend, device) if stage.baseline_shards else (None, None)

    loader = DataLoader(
        ClipStream(manifest),
        batch_size=stage.batch_size,
        collate_fn=partial(collate_clips, num_classes=manifest.num_classes),
        num_workers=min(stage.num_workers, len(manifest.shards)),
        pin_memory=pins_memory(device),
    )
    probs: dict[str, list[np.ndarray]] = {path: [] for path in checkpoints}
    baseline_probs: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        for batch in tqdm(loader, total=-(-manifest.num_samples // stage.batch_size), desc="evaluate",
                          unit="batch", dynamic_ncols=True):
            non_blocking = copies_async(device)
            waveform = batch.waveform.to(device, non_blocking=non_blocking)
            lengths = batch.lengths.to(device, non_blocking=non_blocking)
            for path, model in models.items():
                probs[path].append(clip_probabilities(model, waveform, lengths).cpu().numpy())
            if probe is not None:
                baseline_probs.append(probe.predict(clip_features(frontend, waveform, lengths)))
            labels.append(batch.labels.numpy())
    targets = np.concatenate(labels)
    if len(targets) != manifest.num_samples:
        raise RuntimeError(f"evaluate scored {len(targets)} clips, evaluate.shards={stage.shards} holds "
                           f"{manifest.num_samples}")
    outputs = {path: np.concatenate(chunks) for path, chunks in probs.items()}

    out_dir = Path(stage.out_dir)
    results = {}
    for name, paths in systems.items():
        metrics = tagging_metrics(targets, np.mean([outputs[path] for path in paths], axis=0))
        table = write_per_class_csv(out_dir / f"{name}_per_class.csv", metrics, manifest.class_names)
        results[name] = {**metrics.summary(), "checkpoints": paths, "per_class_csv": str(table)}
    if probe is not None:
        metrics = tagging_metrics(targets, np.concatenate(baseline_probs))
        table = write_per_class_csv(out_dir / f"{BASELINE}_per_class.csv", metrics, manifest.class_names)
        results[BASELINE] = {**metrics.summary(), "checkpoints": [], "per_class_csv": str(table),
                             "fitted_on": fitted_on}
    print(format_table(results, stage.shards), flush=True)
    return {"shards": str(stage.shards), "shards_fingerprint": manifest.fingerprint, "device": str(device),
            "precision": str(dtype).removeprefix("torch.") if dtype else "float32", "systems": results}


def fit_baseline(stage: DictConfig, manifest: Manifest, frontend: LogMelFrontEnd,
                 device: torch.device) -> tuple[LinearProbe, dict]:
    """The linear probe fitted on the labels of `evaluate.baseline_shards`, and what it was fitted on."""
    train = read_manifest(stage.baseline_shards)
    if not train.labelled:
        raise ValueError(f"evaluate.baseline_shards={stage.baseline_shards} holds no labels to fit the baseline on "
                         "(evaluate.baseline_shards=null leaves the baseline out)")
    if train.class_mids != manifest.class_mids:
        raise ValueError(f"evaluate.baseline_shards={stage.baseline_shards} has another class table than "
                         f"evaluate.shards={stage.shards} ({train.num_classes} and {manifest.num_classes} classes)")
    features, targets = shard_features(train, frontend, stage.batch_size, stage.num_workers,
                                       stage.baseline_max_clips, device)
    return fit_probe(features, targets), {"shards": str(stage.baseline_shards), "shards_fingerprint": train.fingerprint,
                                          "clips": len(targets), "features": FEATURES, "C": C}


def format_table(results: dict[str, dict], shards: str) -> str:
    """The systems' scores as an aligned text table."""
    width = max(len("system"), *(len(name) for name in results))
    lines = [f"evaluation on {shards}", f"{'system':<{width}}  {'mAP':>7}  {'mAUC':>7}  {'d-prime':>7}  "
             f"{'clips':>6}  {'classes':>7}  checkpoints"]
    for name, r in results.items():
        lines.append(f"{name:<{width}}  {100 * r['mAP']:7.2f}  {100 * r['mAUC']:7.2f}  {r['d_prime']:7.3f}  "
                     f"{r['num_clips']:6d}  {r['num_classes_scored']:7d}  {len(r['checkpoints'])}")
    return "\n".join(lines)
