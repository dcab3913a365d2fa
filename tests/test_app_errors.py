"""Errors of the Hydra app's stages reach the user as one line and exit code 2, naming the file or option, and leave
nothing half-written: a full disk during the teacher pass, a store of the old format, a checkpoint of other classes,
an export made from other settings."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import torch

from ced_train.augment import AugmentConfig
from ced_train.labels import load_class_labels
from ced_train.models import create_model
from ced_train.stages.teach import teacher_pass
from ced_train.teachers import TeacherEnsemble
from data_prep.sharding import SourceRow, build_shards
from helpers import HashTeacher, app_env, make_shards

REPO = Path(__file__).resolve().parents[1]
SHORT_CLIPS = ("augment.clip_samples=16000", "augment.time_mask_max_frames=20")  # 1 s chunks


def app(root: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ced_train", "~local", f"paths.root_dir={root}",
                           f"hydra.run.dir={root}/run", "logger=none", *overrides], cwd=REPO, capture_output=True,
                          text=True, timeout=180, env=app_env(root))


def error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    return line


@pytest.fixture
def teacher(tmp_path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "teacher.pt"
    torch.save({"model": create_model("ced_test").state_dict()}, path)
    return path


def fill(disk: Path, leave_bytes: int) -> None:
    """Fill the file system of `disk` up to `leave_bytes` free."""
    descriptor = os.open(disk / "filler", os.O_CREAT | os.O_WRONLY)
    written = 0
    try:
        while True:
            written += os.write(descriptor, b"\0" * 65536)
    except OSError as error:
        assert error.errno == errno.ENOSPC
    os.ftruncate(descriptor, max(0, written - leave_bytes))
    os.close(descriptor)


@pytest.mark.parametrize("leave_bytes", [0, 24 * 1024])
def test_a_full_disk_in_the_teacher_pass_is_one_line_and_leaves_no_partial_file(tmp_path, small_disk, teacher,
                                                                              leave_bytes):
    shards = make_shards(tmp_path / "train", [1.0] * 16, samples_per_shard=8)
    fill(small_disk, leave_bytes)
    store = small_disk / "store" / "s.h5"
    line = error_line(app(tmp_path, "stages=[teach]", f"data.train_shards={shards}", f"store.path={store}",
                          "teachers=checkpoints", "teachers.name=one", f"teachers.checkpoints=[{teacher}]",
                          "teach.views=4", "teach.progress=false", *SHORT_CLIPS))
    assert line.startswith("error: stage teach: ") and "No space left on device" in line, line
    left = [path for path in small_disk.rglob("*") if path.is_file() and path.name != "filler"]
    assert not [path for path in left if ".tmp-" in path.name or path.name.endswith(".lock")], left
    assert not store.exists()


def test_distill_on_a_store_of_the_format_before_chunks_is_one_line_saying_to_rerun_the_pass(tmp_path):
    shards = make_shards(tmp_path / "train", [1.0] * 8, samples_per_shard=8)
    store = tmp_path / "store.h5"
    teacher_pass(shards, store, TeacherEnsemble([HashTeacher()], sources=[{"file": "hash"}]),
                 AugmentConfig(clip_samples=16000, time_mask_max_frames=20), seed=0, num_views=2, progress=False)
    with h5py.File(store, "r+") as file:
        file.attrs["format_version"] = 1
    line = error_line(app(tmp_path, "stages=[distill]", f"data.train_shards={shards}", f"data.val_shards={shards}",
                          f"store.path={store}", "teachers=checkpoints", "teachers.name=one", "teachers.checkpoints=[]",
                          *SHORT_CLIPS, "model@distill.model=ced_test", "trainer=cpu"))
    assert str(store) in line and "store format version 1" in line and "teach.overwrite=true" in line, line


def test_evaluate_with_a_checkpoint_of_other_classes_is_one_line_naming_both(tmp_path, teacher):
    labels = tmp_path / "classes.csv"
    labels.write_text('index,mid,display_name\n0,/m/a,"A"\n1,/m/b,"B"\n')
    classes = load_class_labels(labels)
    audio = make_shards(tmp_path / "audio_source", [1.0, 1.0], samples_per_shard=2)  # for its audio files
    rows = [SourceRow(f"c{i}", f"c{i}", path, path.name, (i,), (classes.mids[i],))
            for i, path in enumerate(sorted((tmp_path / "audio_source_audio").glob("*.wav")))]
    assert audio.exists() and len(rows) == 2
    shards = tmp_path / "eval"
    build_shards(rows, shards, classes, tool="test", labelled=True, workers=1, progress=False)
    line = error_line(app(tmp_path, "stages=[evaluate]", f"evaluate.shards={shards}", f"evaluate.checkpoint={teacher}",
                          "evaluate.baseline_shards=null"))
    assert line.startswith("error: stage evaluate: ") and str(teacher) in line and "527 outputs" in line, line


def test_a_setting_a_config_object_refuses_is_one_line_with_the_reason_and_the_option(tmp_path, teacher):
    shards = make_shards(tmp_path / "train", [1.0] * 2, samples_per_shard=2)
    line = error_line(app(tmp_path, "stages=[teach]", f"data.train_shards={shards}", "teachers=checkpoints",
                          "teachers.name=one", f"teachers.checkpoints=[{teacher}]", "augment.clip_samples=16000"))
    assert line.startswith("error: stage teach: augment config: time_mask_max_frames=192 must lie in [0, 101]"), line
    assert "(full_key: augment)" in line


def test_an_export_made_from_other_settings_is_one_line_naming_the_overwrite_option(tmp_path):
    shards = make_shards(tmp_path / "train", [1.0] * 4, samples_per_shard=4)
    export = tmp_path / "teachers" / "member0.ckpt"
    export.parent.mkdir()
    torch.save({"ced_model": {}, "ced_provenance": {"fingerprint": "0123456789abcdef"}}, export)
    line = error_line(app(tmp_path, "stages=[train]", f"data.train_shards={shards}", f"data.val_shards={shards}",
                          f"train.out_dir={export.parent}", "model@train.model=ced_test"))
    assert line.startswith(f"error: {export} exists and was made from other inputs"), line
    assert "0123456789abcdef" in line and "train.overwrite=true" in line
