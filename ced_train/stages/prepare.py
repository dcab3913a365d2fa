"""Stage `prepare`: raw data → shard directories, through the data_prep tools (which reuse a finished output of
equal inputs and settings, and say so). For the demo it first writes the synthetic AudioSet-format dataset. A split
may hold out a fraction of its clips as another shard directory (`holdout: {name, fraction, out}`): the validation
split of datasets that come with only a training and an evaluation list.

Runs in the process of global rank 0 only: preparing data is a single job, not a distributed one.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from ced_train.data import read_manifest
from ced_train.stages import is_global_zero

log = logging.getLogger(__name__)


class PrepareError(RuntimeError):
    """A data_prep tool failed; its own message (on stderr) says why."""


def _call(tool: str, main, argv: list[str]) -> None:
    log.info("prepare: python -m %s %s", tool, " ".join(argv))
    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse errors
        status = exit_.code
    if status:
        raise PrepareError(f"python -m {tool} {' '.join(argv)} failed with exit status {status}")


def run(cfg: DictConfig) -> dict:
    if not is_global_zero():
        return {}
    from data_prep import audioset, synthetic

    stage = cfg.prepare
    if stage.synthetic is not None:
        gen = stage.synthetic
        _call("data_prep.synthetic", synthetic.main, [
            "--out", str(gen.out), "--train", str(gen.train), "--eval", str(gen.eval), "--seed", str(gen.seed),
            "--workers", str(stage.workers),
        ])
    shards = {}
    for split, source in stage.splits.items():
        argv = ["--segments", *map(str, source.segments), "--audio-dir", str(source.audio_dir), "--out",
                str(source.out), "--samples-per-shard", str(stage.samples_per_shard), "--codec", str(stage.codec),
                "--workers", str(stage.workers),
                "--seed", str(cfg.seed), "--no-progress"]
        if stage.class_labels:
            argv += ["--class-labels", str(stage.class_labels)]
        holdout = source.get("holdout")
        if holdout:
            argv += ["--holdout", str(holdout.fraction), "--holdout-out", str(holdout.out)]
        _call("data_prep.audioset", audioset.main, argv)
        shards[split] = _summary(source.out)
        if holdout:
            shards[holdout.name] = _summary(holdout.out)
    return {"shards": shards}


def _summary(out: str) -> dict:
    manifest = read_manifest(out)
    return {"path": str(Path(out)), "fingerprint": manifest.fingerprint, "clips": manifest.num_samples,
            "classes": manifest.num_classes, "shards": len(manifest.shards), "hours": manifest.total_hours,
            "skipped": manifest.skipped_by_reason}
