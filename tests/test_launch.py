"""Runs that a launcher starts as several processes (`srun` tasks): stages prepare and teach run once, on global rank
0, and the other ranks wait for their outputs and go on with their results; a failure of rank 0 ends them in one
line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from ced_train.models import create_model
from helpers import app_env

REPO = Path(__file__).resolve().parents[1]
# Run the app's stages in-process and print their results as JSON (the run directory is per process here).
SCRIPT = """
import json, sys
from ced_train.__main__ import compose, run_stages
print("RESULTS " + json.dumps(run_stages(compose(sys.argv[1:]))[0]))
"""
PREPARE = ["~local", "stages=[prepare]", "augment.clip_samples=32000", "prepare.synthetic.train=32", "prepare.synthetic.eval=8",
           "prepare.samples_per_shard=8", "prepare.workers=1"]


def start_ranks(root: Path, overrides: list[str], world_size: int = 3) -> list[subprocess.Popen]:
    """`world_size` processes of one SLURM step (SLURM_PROCID 0..n-1), each with its own output directory."""
    processes = []
    for rank in range(world_size):
        env = {**app_env(root), "SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_NTASKS": str(world_size),
               "SLURM_PROCID": str(rank), "PYTHONPATH": str(REPO)}
        command = [sys.executable, "-c", SCRIPT, f"paths.root_dir={root}", f"paths.output_dir={root}/run{rank}",
                   *overrides]
        processes.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True))
    return processes


def finish(processes: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
    return [(process.wait(timeout=240), *process.communicate()) for process in processes]


def test_srun_tasks_prepare_and_teach_once_on_rank_zero_and_the_others_go_on_with_its_outputs(tmp_path):
    teachers = []
    for seed in range(2):
        torch.manual_seed(seed)
        teachers.append(str(tmp_path / f"teacher{seed}.pt"))
        torch.save({"model": create_model("ced_test").state_dict()}, teachers[-1])
    teach = ["stages=[prepare,teach]", "teachers=checkpoints", "teachers.name=random",
             f"teachers.checkpoints=[{teachers[0]},{teachers[1]}]", "teach.views=2", "teach.progress=false"]
    outcomes = finish(start_ranks(tmp_path, [*PREPARE, *teach]))
    assert [code for code, _, _ in outcomes] == [0, 0, 0], outcomes[0][2][-2000:]
    results = [json.loads(out.split("RESULTS ", 1)[1]) for _, out, _ in outcomes]
    shards = results[0]["prepare"]["shards"]
    assert set(shards) == {"train", "val", "eval"} and shards["train"]["clips"] > 0
    assert results[0]["teach"]["rows_run_by_this_rank"] == results[0]["teach"]["rows"] > 0
    assert results[1] == results[2] == results[0]  # the waiting ranks hold rank 0's results, written when it was done
    sharded = [out.count("class labels:") for _, out, _ in outcomes]  # data_prep.audioset's first line, per split
    assert sharded == [2, 0, 0]
    assert [out.count("teach: store written") for _, out, _ in outcomes] == [1, 0, 0]


def test_waiting_ranks_end_in_one_line_when_rank_zero_fails(tmp_path):
    # Twelve training clips: the 10 % validation hold-out (by a hash of the ids) selects none, and data_prep refuses
    # (on rank 0 only).
    overrides = [*PREPARE, "prepare.synthetic.train=12"]
    outcomes = finish(start_ranks(tmp_path, overrides))
    assert "selects none" in outcomes[0][2] and all(code != 0 for code, _, _ in outcomes)
    for _, _, err in outcomes[1:]:
        assert "stage prepare: global rank 0 failed (PrepareError: python -m data_prep.audioset" in err
