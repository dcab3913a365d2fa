"""Recipe tiny_distill_audioset: the demo's pipeline on any directory in AudioSet's layout (paths.audioset_dir), run
for real on a small one from data_prep.synthetic. Its shards, store and models go under its own data name (another
data.name keeps another directory's apart), its classes come from the directory's class_labels_indices.csv (the
shipped 527-class file when there is none), part of the training list becomes the validation split, and an unset
paths.audioset_dir stops the run at once."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from ced_train.__main__ import compose, run_stages
from ced_train.data import read_manifest
from ced_train.labels import NUM_AUDIOSET_CLASSES, load_class_labels
from data_prep import synthetic
from data_prep.audioset import LABEL_FILE_NAME, default_class_labels
from helpers import ENV_VARS, app_env, run_until_stalled

REPO = Path(__file__).resolve().parents[1]
RECIPE = "tiny_distill_audioset"
# tests/test_e2e.py's shrinking, for a directory instead of the synthetic generator and cut to one epoch of each
# training stage (the run's cost is mostly fixed per model); a quarter held out so that the 32-row list leaves
# validation clips.
SHRINK = [
    "prepare.splits.train.holdout.fraction=0.25", "prepare.samples_per_shard=16", "prepare.workers=1",
    "data.batch_size=8", "data.eval_batch_size=8", "data.num_workers=0",
    "augment.clip_samples=32000", "train.augment.clip_samples=32000",
    "train.trainer.max_epochs=1", "train.trainer.check_val_every_n_epoch=1", "train.optim.scheduler.warmup_steps=1",
    "teach.views=2", "teach.progress=false",
    "distill.trainer.max_epochs=1", "distill.trainer.check_val_every_n_epoch=1",
    "distill.optim.scheduler.warmup_steps=1",
    "logger=csv", "trainer.enable_progress_bar=false", "~callbacks.progress_bar",
]


@pytest.fixture(scope="module")
def own_dir(tmp_path_factory) -> Path:
    """`python -m data_prep.synthetic --out DIR --train 32 --eval 16`, its label file cut to the 14 classes the clips
    use (in AudioSet's order, indices renumbered): a directory of someone's own labelled audio. Read-only."""
    root = tmp_path_factory.mktemp("own") / "audioset_format"
    assert synthetic.main(["--out", str(root), "--train", "32", "--eval", "16", "--workers", "1"]) == 0
    used = sorted(json.loads((root / "synthetic.json").read_text())["classes"], key=lambda c: c["index"])
    lines = ["index,mid,display_name"] + [f'{i},{c["mid"]},"{c["name"]}"' for i, c in enumerate(used)]
    (root / LABEL_FILE_NAME).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def test_own_directory_is_distilled_under_its_own_name_with_its_own_classes(own_dir, tmp_path):
    result = run_until_stalled(
        [sys.executable, "-m", "ced_train", f"+recipe={RECIPE}", "~local", f"paths.audioset_dir={own_dir}", *SHRINK],
        cwd=REPO, env=app_env(tmp_path), watch=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    results_path = Path(result.stdout.strip().splitlines()[-1].removeprefix("results: "))
    assert results_path.parent.parent == tmp_path / "runs" / RECIPE
    results = json.loads(results_path.read_text())
    assert results["stages"] == ["prepare", "train", "teach", "distill", "evaluate"]

    # Shards under the recipe's own data name, nothing in the demo's or the AudioSet recipes' places.
    shards = tmp_path / "data" / "shards"
    assert sorted(path.name for path in shards.iterdir()) == ["own_audioset"]
    assert not (tmp_path / "data" / "synthetic").exists()
    own_mids = load_class_labels(own_dir / LABEL_FILE_NAME).mids
    manifests = {split: read_manifest(shards / "own_audioset" / split) for split in ("train", "val", "eval")}
    for split, manifest in manifests.items():
        assert manifest.class_mids == own_mids, split  # the directory's 14 classes, not AudioSet's 527
    prepared = results["results"]["prepare"]["shards"]
    assert {split: prepared[split]["classes"] for split in manifests} == {split: 14 for split in manifests}
    assert prepared["val"]["clips"] > 0 and prepared["train"]["clips"] > prepared["val"]["clips"]
    assert not manifests["val"].shard_of_key().keys() & manifests["train"].shard_of_key().keys()

    # Store and models under their own names too; the demo's systems plus the baseline, scored on the eval split.
    assert (tmp_path / "data" / "store" / f"{RECIPE}_teachers" / "own_audioset.h5").is_file()
    artifacts = tmp_path / "runs" / "artifacts" / RECIPE / "own_audioset"
    assert (artifacts / "student" / "student.ckpt").is_file()
    assert sorted(path.name for path in (artifacts / "teachers").glob("member*.ckpt")) == [
        "member0.ckpt", "member1.ckpt", "member2.ckpt"]
    systems = results["results"]["evaluate"]["systems"]
    assert list(systems) == ["teacher0", "teacher1", "teacher2", "ensemble", "student", "baseline_logreg"]
    for name, scores in systems.items():
        assert 0.0 < scores["mAP"] <= 1.0, name
        assert scores["num_clips"] == prepared["eval"]["clips"], name
    assert (results_path.parent / "results.md").is_file()


def test_directory_without_class_labels_is_prepared_with_the_shipped_audioset_classes_in_the_codec_asked(
        own_dir, tmp_path, monkeypatch):
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    bare = tmp_path / "bare"
    shutil.copytree(own_dir, bare)
    (bare / LABEL_FILE_NAME).unlink()
    cfg = compose([f"+recipe={RECIPE}", "~local", f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/run",
                   f"paths.audioset_dir={bare}", "stages=[prepare]", "prepare.codec=pcm16", *SHRINK])
    results, _ = run_stages(cfg)
    assert {split: summary["classes"] for split, summary in results["prepare"]["shards"].items()} == {
        "train": NUM_AUDIOSET_CLASSES, "val": NUM_AUDIOSET_CLASSES, "eval": NUM_AUDIOSET_CLASSES}
    for summary in results["prepare"]["shards"].values():
        assert json.loads((Path(summary["path"]) / "manifest.json").read_text())["codec"] == "pcm16"
        first_shard = sorted(Path(summary["path"]).glob("*.tar"))[0]
        with tarfile.open(first_shard) as tar:
            assert any(name.endswith(".pcm16") for name in tar.getnames())
            assert not any(name.endswith(".flac") for name in tar.getnames())
    assert read_manifest(tmp_path / "data" / "shards" / "own_audioset" / "train").class_mids == load_class_labels().mids


def test_label_file_default_is_the_one_beside_the_segments_else_the_shipped_one(own_dir, tmp_path):
    segments = own_dir / "balanced_train_segments.csv"
    assert default_class_labels([segments, tmp_path / "other.csv"]) == own_dir / LABEL_FILE_NAME
    (tmp_path / "balanced_train_segments.csv").write_bytes(segments.read_bytes())
    assert len(load_class_labels(default_class_labels([tmp_path / "balanced_train_segments.csv"]))) == \
        NUM_AUDIOSET_CLASSES


def test_outputs_are_kept_apart_from_the_demo_the_audioset_recipes_and_another_data_name(tmp_path, monkeypatch):
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)

    def outputs(recipe: str, *overrides: str) -> dict[str, str]:
        cfg = compose([f"+recipe={recipe}", "~local", f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/run",
                       f"paths.audioset_dir={tmp_path}/own", f"paths.checkpoints_dir={tmp_path}/ced", *overrides])
        return {"train_shards": cfg.data.train_shards, "val_shards": cfg.data.val_shards,
                "eval_shards": cfg.data.eval_shards, "store": cfg.store.path,
                "teachers": cfg.train.out_dir, "student": cfg.distill.out_dir}

    own = outputs(RECIPE)
    assert own["train_shards"] == f"{tmp_path}/data/shards/own_audioset/train"
    assert own["store"] == f"{tmp_path}/data/store/{RECIPE}_teachers/own_audioset.h5"
    others = [outputs("tiny_distill"), outputs("audioset_tiny_balanced"), outputs(RECIPE, "data.name=second")]
    for other in others:
        for key in ("train_shards", "val_shards", "eval_shards", "store"):
            assert own[key] != other[key], key
    assert all(own[key] != others[2][key] for key in own)  # a second directory shares nothing with the first
    # The defaults are the recipe's, for real data, not the demo's.
    cfg = compose([f"+recipe={RECIPE}", "~local", f"paths.root_dir={tmp_path}", f"paths.audioset_dir={tmp_path}/own"])
    assert cfg.prepare.synthetic is None and cfg.prepare.splits.train.holdout.fraction == 0.15
    assert list(cfg.prepare.splits) == ["train", "eval"]
    assert (cfg.train.trainer.max_epochs, cfg.teach.views, cfg.distill.trainer.max_epochs) == (30, 32, 100)
    # The student's whole cosine schedule, not a stop on the plateau of its high learning rate.
    assert cfg.callbacks.early_stopping.patience * cfg.distill.trainer.check_val_every_n_epoch >= 50
    assert cfg.train.model.name == compose(["+recipe=tiny_distill", "~local"]).train.model.name


def test_unset_audioset_dir_stops_before_any_stage_naming_the_option_and_variable(tmp_path):
    result = subprocess.run([sys.executable, "-m", "ced_train", f"+recipe={RECIPE}", "~local"], cwd=REPO,
                            env=app_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: missing inputs:") and "Traceback" not in result.stdout + result.stderr
    assert "stage prepare reads prepare.splits.train.segments[0] = None/balanced_train_segments.csv" in result.stderr
    assert "paths.audioset_dir is not set: set the environment variable AUDIOSET_DIR, or paths.audioset_dir=..." \
        in result.stderr
    assert not (tmp_path / "data").exists()
