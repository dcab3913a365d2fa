"""`python -m ced_train +recipe=tiny_distill` end to end on a shrunk configuration: from nothing to the mAP table and
results.md with its plots, then again, when every stage reuses what the first run made and says so."""

import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import run_until_stalled

REPO = Path(__file__).resolve().parents[1]
SHRINK = [
    "prepare.synthetic.train=32", "prepare.synthetic.eval=16", "prepare.samples_per_shard=16", "prepare.workers=1",
    "data.batch_size=4", "data.eval_batch_size=8",
    # 2 s training chunks (validation and evaluation still score the full clips)
    "augment.clip_samples=32000", "train.augment.clip_samples=32000",
    "train.trainer.max_epochs=2", "train.trainer.check_val_every_n_epoch=1", "train.optim.scheduler.warmup_steps=2",
    "teach.views=2", "teach.progress=false",
    "distill.trainer.max_epochs=2", "distill.trainer.check_val_every_n_epoch=1",
    "distill.optim.scheduler.warmup_steps=2",
    "trainer.enable_progress_bar=false", "~callbacks.progress_bar",
]


def run_demo(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CED_ROOT": str(root), "WANDB_SILENT": "true"}
    env.pop("WANDB_MODE", None)  # offline must be the configuration's default, not the environment's
    return run_until_stalled([sys.executable, "-m", "ced_train", "+recipe=tiny_distill", "~local", *SHRINK], cwd=REPO,
                             env=env, watch=root)


def test_tiny_distill_runs_end_to_end_then_reuses_every_stage(tmp_path):
    first = run_demo(tmp_path)
    assert first.returncode == 0, first.stderr[-4000:]
    lines = first.stdout.strip().splitlines()
    assert lines[-1].startswith("results: ")
    results_path = Path(lines[-1].removeprefix("results: "))
    assert results_path.parent.parent == tmp_path / "runs" / "tiny_distill"
    results = json.loads(results_path.read_text())
    assert results["stages"] == ["prepare", "train", "teach", "distill", "evaluate"]
    systems = results["results"]["evaluate"]["systems"]
    assert list(systems) == ["teacher0", "teacher1", "teacher2", "ensemble", "student", "baseline_logreg"]
    assert len(systems["ensemble"]["checkpoints"]) == 3
    for name, scores in systems.items():
        assert 0.0 < scores["mAP"] <= 1.0 and scores["num_clips"] == results["results"]["prepare"]["shards"]["eval"]["clips"]
        assert Path(scores["per_class_csv"]).is_file()
    table = "\n".join(lines)
    assert "ensemble" in table and "student" in table and "mAP" in table
    # wandb is offline by default, its files inside the run directory
    assert list(results_path.parent.glob("wandb/offline-run-*"))
    assert not results["results"]["distill"]["reused"]
    assert set(results["seconds"]) == {"total", *results["stages"]}
    # results.md: every system's row, the settings, and both plots as PNG files beside it
    assert lines[-2] == f"report: {results_path.parent / 'results.md'}"
    report = (results_path.parent / "results.md").read_text()
    for name, scores in systems.items():
        assert f"| {name} | {100 * scores['mAP']:.2f} | {100 * scores['mAUC']:.2f} |" in report
    assert "| `distill.model.name` | `ced_tiny` |" in report and "| distill |" in report
    for plot in ("val_map.png", "per_class_ap.png"):
        assert f"]({plot})" in report
        png = (results_path.parent / plot).read_bytes()
        assert len(png) > 1000 and png[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(len(member["val_history"]) == 2 for member in results["results"]["train"]["members"])

    second = run_demo(tmp_path)
    assert second.returncode == 0, second.stderr[-4000:]
    log = second.stdout + second.stderr
    assert "nothing to do" in log  # data_prep: the synthetic dataset and both shard directories
    assert log.count("train: reusing") == 3
    assert "is up to date" in log  # the teacher store
    assert "distill: reusing" in log
    again = json.loads(Path(second.stdout.strip().splitlines()[-1].removeprefix("results: ")).read_text())
    assert again["results"]["distill"]["reused"] is True
    # the reused exports' provenance keeps the validation history, so the second report plots it too
    assert again["results"]["distill"]["val_history"] == results["results"]["distill"]["val_history"]
    assert (Path(again["run_dir"]) / "val_map.png").is_file()
    assert again["results"]["evaluate"]["systems"]["student"]["mAP"] == systems["student"]["mAP"]
