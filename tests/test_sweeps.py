"""Sweeps (`python -m ced_train -m`) start and finish: the seed sweep that docs/recipes.md shows, shrunk to one epoch
of a test-sized teacher on eight clips, through Hydra's basic launcher and through submitit's local executor (the
SLURM path's pickled jobs without a cluster). Each job writes its own results.json into
<runs_dir>/<name>/multirun/<timestamp>/<job number>/, with absolute paths, and trains with its own seed."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from ced_train.__main__ import CONFIG_DIR
from ced_train.models import load_checkpoint
from helpers import make_shards

RECIPES_DOC = CONFIG_DIR.parent / "docs" / "recipes.md"
# The documented sweep, cut to seconds: one epoch at batch 4 over 2-second clips, no logger or progress bar.
SHRINK = ["~local", "trainer=cpu", "trainer.enable_progress_bar=false", "~callbacks.progress_bar", "logger=none",
          "~callbacks.lr_monitor", "data.batch_size=4", "data.eval_batch_size=8", "train.augment.clip_samples=32000",
          "train.trainer.max_epochs=1", "train.trainer.check_val_every_n_epoch=1", "callbacks.average_best.num_best=1",
          "train.optim.scheduler.warmup_steps=1"]
# Variables that would move the run's paths or make Lightning think another launcher started it.
CALLER_VARIABLES = ("CED_ROOT", "CED_DATA_DIR", "CED_RUNS_DIR", "AUDIOSET_DIR", "CED_CHECKPOINTS_DIR", "LOCAL_RANK",
                    "RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_JOB_ID")


def documented_sweep(launcher: str | None) -> list[str]:
    """The arguments after `python -m ced_train` of docs/recipes.md's demo seed sweep through `launcher` (None: the
    one without a `hydra/launcher=` choice)."""
    commands, pending = [], ""
    for line in RECIPES_DOC.read_text().splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("python -m ced_train -m ") and "+recipe=tiny_distill" in line:
            commands.append(shlex.split(line)[3:])
    wanted = [f"hydra/launcher={launcher}"] if launcher else []
    chosen = [args for args in commands if [arg for arg in args if arg.startswith("hydra/launcher=")] == wanted]
    assert len(chosen) == 1, f"{RECIPES_DOC}: expected one tiny_distill sweep through {launcher}, found {chosen}"
    return chosen[0]


def demo_shards(root: Path) -> None:
    """Labelled shards where tiny_distill's train stage reads the demo's (data/shards/synthetic/{train,val,eval})."""
    for split in ("train", "val", "eval"):
        make_shards(root / "data" / "shards" / "synthetic" / split, [2.0] * 8, samples_per_shard=4)


def run_sweep(args: list[str], cwd: Path, ced_root: Path | None) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in CALLER_VARIABLES}
    if ced_root is not None:
        env["CED_ROOT"] = str(ced_root)
    return subprocess.run([sys.executable, "-m", "ced_train", *args, *SHRINK], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def check_seed_jobs(root: Path, result: subprocess.CompletedProcess) -> None:
    """Both jobs of the `seed=0,1` sweep finished in <root>/runs/tiny_distill/multirun/<timestamp>/{0,1}/, each
    recording its own seed and training its own teacher there."""
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [sweep_dir] = (root / "runs" / "tiny_distill" / "multirun").iterdir()
    assert (sweep_dir / "multirun.yaml").is_file()
    members, weights = [], []
    for job in (0, 1):
        job_dir = sweep_dir / str(job)
        results = json.loads((job_dir / "results.json").read_text())
        assert results["run_dir"] == str(job_dir)
        assert yaml.safe_load((job_dir / ".hydra" / "config.yaml").read_text())["seed"] == job
        [member] = results["results"]["train"]["members"]
        assert member["checkpoint"] == str(job_dir / "train" / "member0.ckpt") and member["reused"] is False
        members.append(member)
        weights.append(torch.cat([p.flatten() for p in load_checkpoint(member["checkpoint"]).parameters()]))
    assert members[0]["fingerprint"] != members[1]["fingerprint"]  # the seed is part of the training's identity
    assert not torch.equal(weights[0], weights[1])


def test_documented_seed_sweep_runs_both_jobs_into_the_multirun_dir_of_the_start_directory(tmp_path):
    demo_shards(tmp_path)
    args = documented_sweep(None)
    assert "seed=0,1" in args
    check_seed_jobs(tmp_path, run_sweep(args, cwd=tmp_path, ced_root=None))
    assert not (tmp_path / "runs" / "artifacts").exists()  # the teachers went into the jobs, not the demo's store


def test_documented_seed_sweep_through_submitit_local_runs_pickled_jobs_under_ced_root(tmp_path):
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    elsewhere.mkdir()
    demo_shards(root)
    args = documented_sweep("slurm_local")
    result = run_sweep(args, cwd=elsewhere, ced_root=root)
    check_seed_jobs(root, result)
    [sweep_dir] = (root / "runs" / "tiny_distill" / "multirun").iterdir()
    # submitit ran the jobs (each a pickled call with its own log), with the project's timeout, not its 60 minutes.
    logs = sorted(path.name for path in (sweep_dir / ".submitit").rglob("*_log.out"))
    assert len(logs) == 2, logs
    hydra_cfg = yaml.safe_load((sweep_dir / "0" / ".hydra" / "hydra.yaml").read_text())["hydra"]
    assert hydra_cfg["launcher"]["_target_"].endswith("submitit_launcher.LocalLauncher")
    assert hydra_cfg["launcher"]["timeout_min"] == 4320
    assert not list(elsewhere.iterdir())  # nothing written where the sweep was started
