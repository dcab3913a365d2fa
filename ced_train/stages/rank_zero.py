"""Stages one process runs for all: in a run that a launcher started as several processes (`srun` tasks, torchrun),
global rank 0 runs stage `prepare` (and `teach` where no process group can form: SLURM tasks without torchrun), and
the other ranks wait for it, then go on with its result.

They meet through marker files in a hidden `.ranks/` directory beside the stage's outputs (a file system every node
sees, as the outputs themselves must be): rank 0 writes `<stage>-<launch>.done` (its result, JSON) or `.failed` (its
error), atomically; `<launch>` is keyed by the launch (SLURM job and step, torchrun run id, or rendezvous address),
so a marker of an earlier launch never releases a later one. Processes that Lightning starts itself (LOCAL_RANK set,
no RANK) are not a launch: they run after their parent has finished these stages and find the outputs done.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig

from ced_train.data.manifest import write_json_atomic

log = logging.getLogger(__name__)

POLL_S = 2.0
REPORT_EVERY_S = 300.0


class RankZeroFailed(RuntimeError):
    """Global rank 0 failed in a stage the other ranks were waiting for; its message is rank 0's error."""


def launched_ranks() -> tuple[int, int] | None:
    """`(global rank, world size)` of a process that a launcher started among several: torchrun (RANK, WORLD_SIZE)
    or SLURM tasks (SLURM_PROCID, SLURM_NTASKS); None otherwise."""
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "LOCAL_RANK" not in os.environ:
        return int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
    return None


def launch_id() -> str:
    """What every process of one launch shares and the next launch does not."""
    for keys in (("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_RESTART_COUNT"), ("TORCHELASTIC_RUN_ID",),
                 ("MASTER_ADDR", "MASTER_PORT")):
        if keys[0] in os.environ:
            return "/".join(os.environ.get(key, "") for key in keys)
    raise RuntimeError("several launched processes, but no SLURM_JOB_ID, TORCHELASTIC_RUN_ID or MASTER_ADDR to tell "
                       "this launch from another")


def run_on_rank_zero(stage: str, run: Callable[[DictConfig], dict], cfg: DictConfig, beside: str | Path) -> dict:
    """`run(cfg)` on global rank 0 of a launch, its result on every rank; `beside`: a directory beside the stage's
    outputs (the markers go to `beside/.ranks/`). Outside a launch, `run(cfg)` as is."""
    ranks = launched_ranks()
    if ranks is None:
        return run(cfg)
    rank, world_size = ranks
    digest = hashlib.sha256(launch_id().encode()).hexdigest()[:16]
    marker = Path(beside) / ".ranks" / f"{stage}-{digest}"
    done, failed = marker.with_suffix(".done"), marker.with_suffix(".failed")
    if rank == 0:
        marker.parent.mkdir(parents=True, exist_ok=True)
        try:
            result = run(cfg)
        except BaseException as error:
            write_json_atomic(failed, {"error": f"{type(error).__name__}: {error}"})
            raise
        write_json_atomic(done, {"result": result})
        return result
    log.info("stage %s: rank %d of %d waits for global rank 0 (%s)", stage, rank, world_size, done)
    start = last_report = time.monotonic()
    while not done.exists():
        if failed.exists():
            raise RankZeroFailed(f"stage {stage}: global rank 0 failed ({json.loads(failed.read_text())['error']}); "
                                 "its log says more")
        time.sleep(POLL_S)
        if time.monotonic() - last_report > REPORT_EVERY_S:
            last_report = time.monotonic()
            log.info("stage %s: rank %d still waits for global rank 0 (%.0f min)", stage, rank,
                     (last_report - start) / 60)
    return json.loads(done.read_text())["result"]
