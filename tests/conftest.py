"""Shared fixtures. Add fixtures here; do not remove or change the meaning of existing ones (other tests use them)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from helpers import ENV_VARS


@pytest.fixture(scope="session", autouse=True)
def _no_project_variables():
    """Every test and fixture, and every process they start, runs without the caller's AUDIOSET_DIR and CED_* paths
    (session-wide, so before any module fixture composes a config): a test that needs one sets it itself. App runs
    in tests also pass `~local`, so a developer's configs/local is ignored."""
    with pytest.MonkeyPatch.context() as patch:
        for name in ENV_VARS:
            patch.delenv(name, raising=False)
        yield


@pytest.fixture(scope="session")
def synthetic_audioset(tmp_path_factory) -> Path:
    """A small synthetic dataset in AudioSet's layout (data_prep.synthetic): 24 train + 12 eval rows, each split
    with one missing, one corrupt and one empty file. Read-only: copy it before changing anything."""
    from data_prep.synthetic import generate

    root = tmp_path_factory.mktemp("synthetic_audioset")
    generate(root, train=24, eval_=12, seed=0, workers=1)
    return root


@pytest.fixture(scope="session")
def synthetic_train_shards(synthetic_audioset, tmp_path_factory) -> Path:
    """The synthetic train split prepared by data_prep.audioset: 21 clips in 3 shards of up to 8 (527 classes).
    Read-only: tests that write must use their own directory."""
    from ced_train.labels import load_class_labels
    from data_prep.audioset import AudioIndex, read_segments
    from data_prep.sharding import build_shards

    classes = load_class_labels(synthetic_audioset / "class_labels_indices.csv")
    inputs = read_segments([synthetic_audioset / "balanced_train_segments.csv"],
                           AudioIndex(synthetic_audioset / "audio" / "balanced_train"), classes)
    out = tmp_path_factory.mktemp("synthetic_train_shards")
    build_shards(inputs, out, classes, tool="data_prep.audioset", labelled=True, samples_per_shard=8, workers=1,
                 progress=False)
    return out


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs mounted for this test, to fill (needs root, as CI runs; skipped where mounting is refused)."""
    mount_point = tmp_path / "small_disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)
