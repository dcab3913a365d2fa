"""The teacher pass end to end on tiny real shards and tiny CED teachers: store contents, bit-exact replay in the
student's data path, 2 processes over gloo, kill and resume, and what `verify` catches."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import textwrap
import time
from datetime import timedelta
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from ced_train import store as store_module
from ced_train.augment import AugmentConfig
from ced_train.data import read_manifest
from ced_train.models import create_model
from ced_train.stages.teach import teacher_pass
from ced_train.store import StoreError, StoreLock, TeacherStore, info, verify
from ced_train.teachers import TeacherEnsemble, load_ensemble
from ced_train.rendering import ViewRenderer
from ced_train.views import ViewDataset, collate_items
from helpers import HashTeacher, make_shards, spawn_bounded

AUGMENT = AugmentConfig(mixup_prob=0.75, mixup_block_clips=2)
VIEWS = 3
CLIPS = 21  # the synthetic_train_shards fixture
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, synthetic_train_shards):
    """The synthetic dataset's train shards (21 clips, 3 shards), two `ced_test` teacher checkpoints, and the store
    of one pass over them."""
    root = tmp_path_factory.mktemp("teach")
    shards = synthetic_train_shards
    checkpoints = []
    for seed in range(2):
        torch.manual_seed(seed)
        checkpoints.append(root / f"teacher{seed}.pt")
        torch.save({"model": create_model("ced_test").state_dict()}, checkpoints[-1])
    store = root / "store" / "tiny.h5"
    teacher_pass(shards, store, load_ensemble(checkpoints), AUGMENT, seed=0, num_views=VIEWS, batch_size=4,
                 progress=False)
    return {"root": root, "shards": shards, "checkpoints": checkpoints, "store": store}


def read_arrays(path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as file:
        return {name: file[name][...] for name in store_module.DATASETS}


def assert_same_store(a, b) -> None:
    arrays_a, arrays_b = read_arrays(a), read_arrays(b)
    for name in store_module.DATASETS:
        assert np.array_equal(arrays_a[name], arrays_b[name]), name


def test_two_teacher_store_passes_verify_and_holds_every_clip_view(tiny, capsys):
    summary = verify(tiny["store"], tiny["shards"])
    assert (summary["rows"], summary["views"], summary["coverage"]) == (CLIPS, VIEWS, 1.0)
    assert [t["file"] for t in summary["teachers"]] == ["teacher0.pt", "teacher1.pt"]
    assert summary["payload_bytes_per_row_view"] == 93
    assert store_module.main(["verify", str(tiny["store"]), "--shards", str(tiny["shards"])]) == 0
    assert "ok" in capsys.readouterr().out
    assert store_module.main(["info", str(tiny["store"])]) == 0
    assert "coverage" in capsys.readouterr().out
    assert info(tiny["store"])["teacher_precision"] == "float32"  # teach.precision=auto on a CPU


def test_stored_outputs_are_the_ensembles_top_k_for_the_replayed_inputs(tiny):
    ensemble = load_ensemble(tiny["checkpoints"])
    dataset = ViewDataset(tiny["shards"], store=tiny["store"])
    dataset.set_epoch(1)
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=8, collate_fn=collate_items)))
    with torch.no_grad():
        values, indices = ensemble(ViewRenderer()(batch["inputs"])).topk(20)
    # float16 storage; the order may differ only between near-equal probabilities.
    assert torch.allclose(batch["topk_values"], values, atol=1e-3)
    assert (batch["topk_indices"] == indices).float().mean() > 0.95


def test_a_bf16_pass_on_the_cpu_runs_under_autocast_and_stays_close_to_float32(tiny, tmp_path):
    run = dict(seed=0, num_views=VIEWS, batch_size=4, progress=False)
    teacher_pass(tiny["shards"], tmp_path / "bf16.h5", load_ensemble(tiny["checkpoints"]), AUGMENT,
                 precision="bf16", **run)
    bf16, fp32 = read_arrays(tmp_path / "bf16.h5"), read_arrays(tiny["store"])
    values_bf16, values_fp32 = (arrays["topk_values"].astype(np.float32) for arrays in (bf16, fp32))
    assert not np.array_equal(values_bf16, values_fp32)  # autocast ran: bf16 matmuls round differently
    # The top-1 probability of every (clip, view) within bf16's rounding of the float32 pass.
    np.testing.assert_allclose(values_bf16[..., 0], values_fp32[..., 0], atol=2e-2)
    assert np.array_equal(bf16["view_params"], fp32["view_params"])  # the views themselves do not depend on precision
    with pytest.raises(ValueError, match="teach.precision='fp8'"):
        teacher_pass(tiny["shards"], tmp_path / "x.h5", load_ensemble(tiny["checkpoints"]), AUGMENT,
                     precision="fp8", **run)


@pytest.fixture(scope="module")
def hashed(tiny):
    """A store written by the hash teacher: its stored indices fingerprint the exact tensors the pass fed it."""
    path = tiny["root"] / "store" / "hashed.h5"
    ensemble = TeacherEnsemble([HashTeacher()], sources=[{"file": "hash"}])
    teacher_pass(tiny["shards"], path, ensemble, AUGMENT, seed=0, num_views=VIEWS, batch_size=5, progress=False)
    return path


@pytest.mark.parametrize("num_workers, batch_size", [(0, 1), (0, 8), (2, 3)])
def test_replayed_views_are_bit_identical_to_what_the_teachers_saw(tiny, hashed, num_workers, batch_size):
    dataset = ViewDataset(tiny["shards"], store=hashed)
    seen = set()
    for epoch in range(VIEWS):
        dataset.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                             collate_fn=collate_items)
        for batch in loader:
            _, replayed = HashTeacher()(ViewRenderer()(batch["inputs"])).topk(20)
            assert torch.equal(replayed, batch["topk_indices"]), batch["key"]
            seen.update(zip(batch["key"], batch["view"].tolist()))
    assert len(seen) == CLIPS * VIEWS


def test_a_shard_whose_files_all_failed_to_decode_gets_an_empty_part(tmp_path):
    # Seed 5 puts both empty WAVs (skipped by data_prep) into the first shard.
    shards = make_shards(tmp_path / "shards", [0, 0, 10, 10], 2, seed=5)
    manifest = read_manifest(shards)
    assert [shard.num_samples for shard in manifest.shards] == [0, 2]
    store = tmp_path / "store.h5"
    ensemble = TeacherEnsemble([HashTeacher()], sources=[{"file": "hash"}])
    teacher_pass(shards, store, ensemble, AUGMENT, seed=0, num_views=2, batch_size=4, progress=False)
    assert verify(store, shards)["rows"] == 2
    dataset = ViewDataset(shards, store=store)
    items = list(dataset)
    assert [item["key"] for item in items] == list(manifest.shards[1].keys)
    batch = collate_items(items)
    _, replayed = HashTeacher()(ViewRenderer()(batch["inputs"])).topk(20)
    assert torch.equal(replayed, batch["topk_indices"])


def test_an_unreadable_store_is_refused_and_replaced_only_with_overwrite(tmp_path):
    shards = make_shards(tmp_path / "shards", [10, 5], 2)
    store = tmp_path / "store.h5"
    store.write_bytes(b"not an HDF5 file")
    ensemble = TeacherEnsemble([HashTeacher()], sources=[{"file": "hash"}])
    run = dict(seed=0, num_views=2, batch_size=4, progress=False)
    with pytest.raises(StoreError, match="cannot open"):
        teacher_pass(shards, store, ensemble, AUGMENT, **run)
    teacher_pass(shards, store, ensemble, AUGMENT, overwrite=True, **run)
    assert verify(store, shards)["rows"] == 2


def test_consistent_mixup_is_stored_with_partners_in_the_same_shard(tiny):
    with TeacherStore(tiny["store"]) as store:
        params = np.concatenate([store.read(v, 0, store.num_rows)[2] for v in range(VIEWS)])
        assert (params["partner_row"] >= 0).any() and (params["shift_frames"] != 0).any()
        for name in store.shard_names:
            start, stop = store.shard_rows(name)
            partners = np.stack([store.read(v, start, stop)[2]["partner_row"] for v in range(VIEWS)])
            assert partners.max() < stop - start


def test_a_second_run_with_the_same_settings_does_nothing(tiny, capsys):
    before = tiny["store"].stat().st_mtime_ns
    summary = teacher_pass(tiny["shards"], tiny["store"], load_ensemble(tiny["checkpoints"]), AUGMENT, seed=0,
                           num_views=VIEWS, progress=False)
    assert summary["rows_run_by_this_rank"] == 0 and tiny["store"].stat().st_mtime_ns == before
    assert "up to date" in capsys.readouterr().out


def test_an_existing_store_of_other_settings_is_not_overwritten_unless_asked(tiny):
    with pytest.raises(StoreError, match="mixup_alpha"):
        teacher_pass(tiny["shards"], tiny["store"], load_ensemble(tiny["checkpoints"]),
                     AugmentConfig(mixup_prob=0.75, mixup_block_clips=2, mixup_alpha=0.2), seed=0, num_views=VIEWS,
                     progress=False)


def test_overwrite_replaces_a_store_and_parts_of_other_settings_but_nothing_else(tiny, tmp_path):
    store = Path(shutil.copy(tiny["store"], tmp_path / "other.h5"))
    changed = AugmentConfig(mixup_prob=0.0, mixup_block_clips=2)
    # A leftover part of yet another pass for the first shard.
    with TeacherStore(tiny["store"]) as old:
        first = old.shard_names[0]
        start, stop = old.shard_rows(first)
        arrays = [np.stack([old.read(v, start, stop)[i] for v in range(VIEWS)]) for i in (2, 0, 1)]
        other_spec = dataclasses.replace(old.spec, seed=99)
        store_module.write_part(tmp_path / "other.h5.parts" / f"{first}.h5", other_spec, first,
                                old.keys(start, stop), old.chunks(start, stop), *arrays)
    run = dict(seed=0, num_views=VIEWS, batch_size=4, progress=False)
    with pytest.raises(StoreError, match="mixup_prob"):
        teacher_pass(tiny["shards"], store, load_ensemble(tiny["checkpoints"]), changed, **run)
    store.unlink()
    with pytest.raises(StoreError, match="written for another pass"):
        teacher_pass(tiny["shards"], store, load_ensemble(tiny["checkpoints"]), changed, **run)
    shutil.copy(tiny["store"], store)
    teacher_pass(tiny["shards"], store, load_ensemble(tiny["checkpoints"]), changed, overwrite=True, **run)
    verify(store, tiny["shards"], augment=changed)


def test_a_store_made_at_another_teacher_precision_is_refused_naming_it(tiny):
    before = tiny["store"].stat().st_mtime_ns
    with pytest.raises(StoreError, match="precision: 'float32' != 'bfloat16'") as error:
        teacher_pass(tiny["shards"], tiny["store"], load_ensemble(tiny["checkpoints"]), AUGMENT, seed=0,
                     num_views=VIEWS, precision="bf16", progress=False)
    assert "\n" not in str(error.value) and "teach.overwrite=true" in str(error.value)
    assert tiny["store"].stat().st_mtime_ns == before
    with TeacherStore(tiny["store"]) as made:
        assert made.spec.precision == "float32"  # precision auto on the CPU: no autocast


def test_a_store_written_before_precision_was_recorded_still_verifies_but_a_pass_names_the_precision(tiny, tmp_path):
    path = Path(shutil.copy(tiny["store"], tmp_path / "older.h5"))
    with h5py.File(path, "r+") as file:  # the attributes the code before `precision` wrote
        del file.attrs["precision"]
        file.attrs["fingerprint"] = store_module.StoreSpec.from_attrs(file.attrs).fingerprint()
    verify(path, tiny["shards"])
    with pytest.raises(StoreError, match="precision: not recorded != 'float32'"):
        teacher_pass(tiny["shards"], path, load_ensemble(tiny["checkpoints"]), AUGMENT, seed=0, num_views=VIEWS,
                     progress=False)


def test_teachers_with_different_class_counts_are_refused(tiny):
    path = tiny["root"] / "ten_classes.pt"
    torch.save({"model": create_model("ced_test", num_classes=10).state_dict()}, path)
    with pytest.raises(ValueError, match="number of classes"):
        load_ensemble([tiny["checkpoints"][0], path])


def test_probability_and_logit_averaging():
    class Fixed:
        num_classes = 1

        def __init__(self, logit):
            self.logit = logit

        def __call__(self, mel_db):
            return torch.full((mel_db.shape[0], 1), self.logit)

    mel = torch.zeros(1, 64, 16)
    probs = TeacherEnsemble([Fixed(2.0), Fixed(-2.0)], "probs")(mel)
    logits = TeacherEnsemble([Fixed(2.0), Fixed(-4.0)], "logits")(mel)
    assert probs.item() == pytest.approx(0.5) and logits.item() == pytest.approx(torch.sigmoid(torch.tensor(-1.0)))


# ------------------------------------------------------------------------------------------------- verify


def copy_store(tiny, tmp_path) -> Path:
    return Path(shutil.copy(tiny["store"], tmp_path / "copy.h5"))


def test_verify_catches_a_truncated_store(tiny, tmp_path, capsys):
    path = copy_store(tiny, tmp_path)
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)
    with pytest.raises(StoreError, match="truncated"):
        verify(path, tiny["shards"])
    assert store_module.main(["verify", str(path), "--shards", str(tiny["shards"])]) == 1
    assert "truncated" in capsys.readouterr().err


def test_verify_catches_a_store_made_from_other_shards(tiny, tmp_path):
    other = make_shards(tmp_path / "other", [10, 10, 5], 3, seed=1)
    with pytest.raises(StoreError) as error:
        verify(tiny["store"], other)
    assert "manifest fingerprint" in str(error.value) and "not in the manifest" in str(error.value)


def test_verify_catches_a_changed_augmentation_config(tiny, tmp_path, capsys):
    with pytest.raises(StoreError, match="mixup_block_clips: 2 != 128"):
        verify(tiny["store"], tiny["shards"], augment=AugmentConfig(mixup_prob=0.75))
    expected = REPO / "configs" / "augment" / "ced.yaml"
    argv = ["verify", str(tiny["store"]), "--shards", str(tiny["shards"]), "--augment", str(expected)]
    assert store_module.main(argv) == 1
    assert "mixup_block_clips" in capsys.readouterr().err
    # A store whose recorded config was changed after the pass: the parameters no longer re-draw from it.
    path = copy_store(tiny, tmp_path)
    with h5py.File(path, "r+") as file:
        file.attrs["augment"] = AugmentConfig(mixup_prob=0.75, mixup_block_clips=2, time_mask_max_frames=100).to_json()
    with pytest.raises(StoreError, match="re-drawn parameter records differ") as error:
        verify(path, tiny["shards"])
    assert "attributes were edited" in str(error.value)


def test_verify_reads_an_augment_file_through_its_defaults(tiny, capsys):
    # configs/augment/ced_nomixup.yaml only overrides mixup_prob on top of `defaults: [ced]`.
    expected = REPO / "configs" / "augment" / "ced_nomixup.yaml"
    argv = ["verify", str(tiny["store"]), "--shards", str(tiny["shards"]), "--augment", str(expected)]
    assert store_module.main(argv) == 1
    err = capsys.readouterr().err
    assert "mixup_prob: 0.75 != 0.0" in err and "mixup_block_clips: 2 != 128" in err
    assert "mixup_alpha" not in err and "shift_prob" not in err


@pytest.mark.parametrize(
    "dataset, index, value, message",
    [
        ("topk_indices", (1, 2), -1, "1 .row, view. entries with missing"),
        ("topk_values", (0, 4, 0), 1.5, "values outside"),
        ("topk_values", (2, 0, 3), np.nan, "non-finite"),
        ("topk_indices", (0, 1, 5), 600, "indices outside"),
        ("keys", 1, "first key", "more than once"),
    ],
)
def test_verify_catches_corrupted_entries(tiny, tmp_path, dataset, index, value, message):
    path = copy_store(tiny, tmp_path)
    with h5py.File(path, "r+") as file:
        file[dataset][index] = file["keys"][0] if value == "first key" else value
    with pytest.raises(StoreError, match=message):
        verify(path, tiny["shards"])


# ------------------------------------------------------------------------------------------------- scale


def _two_rank_worker(rank: int, init_file: str, shards: str, store: str, checkpoints: list[str]) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        teacher_pass(shards, store, load_ensemble(checkpoints), AUGMENT, seed=0, num_views=VIEWS, batch_size=4,
                     progress=False)
    finally:
        torch.distributed.destroy_process_group()


def test_two_cpu_processes_over_gloo_write_the_same_store_as_one(tiny, tmp_path):
    store = tmp_path / "two_ranks.h5"
    args = (str(tmp_path / "gloo_init"), str(tiny["shards"]), str(store), [str(p) for p in tiny["checkpoints"]])
    spawn_bounded(_two_rank_worker, args, nprocs=2)
    verify(store, tiny["shards"])
    assert_same_store(store, tiny["store"])
    assert not store.with_name(store.name + ".parts").exists()


def _resumed_rank_worker(rank: int, init_file: str, shards: str, store: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=3)
    try:
        summary = teacher_pass(shards, store, TeacherEnsemble([HashTeacher()], sources=[{"file": "hash"}]), AUGMENT,
                               seed=0, num_views=2, batch_size=4, progress=False)
        Path(f"{store}.rank{rank}.json").write_text(json.dumps(summary))
    finally:
        torch.distributed.destroy_process_group()


def test_a_resumed_pass_splits_only_the_unfinished_shards_across_its_ranks(tmp_path):
    shards = make_shards(tmp_path / "shards", [1.0] * 9, 1)  # 9 shards of one chunk row each
    ensemble = TeacherEnsemble([HashTeacher()], sources=[{"file": "hash"}])
    whole = tmp_path / "whole.h5"
    teacher_pass(shards, whole, ensemble, AUGMENT, seed=0, num_views=2, batch_size=4, progress=False)
    # A killed 3-rank pass whose ranks 0 and 1 finished their shards (0, 3, 6 and 1, 4, 7) and rank 2 none.
    store = tmp_path / "resumed.h5"
    with TeacherStore(whole) as done:
        for name in [done.shard_names[i] for i in (0, 1, 3, 4, 6, 7)]:
            start, stop = done.shard_rows(name)
            arrays = [np.stack([done.read(v, start, stop)[i] for v in range(2)]) for i in (2, 0, 1)]
            store_module.write_part(tmp_path / "resumed.h5.parts" / f"{name}.h5", done.spec, name,
                                    done.keys(start, stop), done.chunks(start, stop), *arrays)
    spawn_bounded(_resumed_rank_worker, (str(tmp_path / "gloo_init"), str(shards), str(store)), nprocs=3)
    summaries = [json.loads(Path(f"{store}.rank{rank}.json").read_text()) for rank in range(3)]
    assert [summary["rows_run_by_this_rank"] for summary in summaries] == [1, 1, 1]  # ceil(3 pending / 3) each
    assert sum(summary["parts_reused_by_this_rank"] for summary in summaries) == 6
    assert_same_store(store, whole)


KILLABLE_PASS = """
import sys, time, torch
from ced_train.augment import AugmentConfig
from ced_train.stages.teach import teacher_pass
from ced_train.teachers import load_ensemble

torch.set_num_threads(1)
shards, store, *checkpoints = sys.argv[1:]
ensemble = load_ensemble(checkpoints)
forward = ensemble.forward

def slow_forward(mel_db):
    time.sleep(0.25)
    return forward(mel_db)

ensemble.forward = slow_forward
teacher_pass(shards, store, ensemble, AugmentConfig(mixup_prob=0.75, mixup_block_clips=2), seed=0, num_views={views},
             batch_size=2, progress=False)
"""


def start_slow_pass(tiny, store: Path) -> subprocess.Popen:
    """`KILLABLE_PASS` writing `store` in a process of its own (output piped)."""
    script = store.with_name("killable.py")
    script.write_text(textwrap.dedent(KILLABLE_PASS).replace("{views}", str(VIEWS)))
    command = [sys.executable, str(script), str(tiny["shards"]), str(store), *map(str, tiny["checkpoints"])]
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def wait_for(process: subprocess.Popen, condition, what: str, timeout_s: float = 120) -> None:
    """Poll `condition()` until true; fail with `what` after `timeout_s` or with the output if the process ended."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert process.poll() is None, process.communicate()[0].decode()
        assert time.monotonic() < deadline, f"{what} within {timeout_s:g} s"
        time.sleep(0.05)


def test_a_killed_pass_resumes_redoing_only_unfinished_shards(tiny, tmp_path):
    store = tmp_path / "resumed.h5"
    parts = tmp_path / "resumed.h5.parts"
    process = start_slow_pass(tiny, store)
    try:
        wait_for(process, lambda: list(parts.glob("*.h5")), "no part written")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    finished = {path.name: path.stat().st_mtime_ns for path in parts.glob("*.h5")}
    assert 1 <= len(finished) < 3 and not store.exists()
    lock = tmp_path / "resumed.h5.lock"
    assert lock.exists()  # left by the killed pass; its process is gone, so the next pass on this host takes it

    summary = teacher_pass(tiny["shards"], store, load_ensemble(tiny["checkpoints"]), AUGMENT, seed=0,
                           num_views=VIEWS, batch_size=4, progress=False)
    assert summary["parts_reused_by_this_rank"] == len(finished)
    verify(store, tiny["shards"])
    assert_same_store(store, tiny["store"])
    assert not parts.exists() and not list(tmp_path.glob("*.tmp-*")) and not lock.exists()


def test_a_pass_stopped_by_sigterm_releases_its_lock_and_a_new_pass_resumes(tiny, tmp_path):
    # SLURM's time limit: SIGTERM, then SIGKILL after KillWait. The pass ends on SIGTERM as a SIGTERM'd process does
    # (exit status 128 + 15), but first releases its lock and removes its temporary files.
    store = tmp_path / "terminated.h5"
    lock = StoreLock.path_of(store)
    process = start_slow_pass(tiny, store)
    try:
        wait_for(process, lock.exists, "no lock taken")
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=60)[0].decode()
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 128 + signal.SIGTERM and "SIGTERM" in output, output
    assert not lock.exists() and not list(tmp_path.rglob("*.tmp-*")) and not store.exists()
    finished = list(tmp_path.glob("terminated.h5.parts/*.h5"))

    summary = teacher_pass(tiny["shards"], store, load_ensemble(tiny["checkpoints"]), AUGMENT, seed=0,
                           num_views=VIEWS, batch_size=4, progress=False)
    assert summary["parts_reused_by_this_rank"] == len(finished)
    assert_same_store(store, tiny["store"])
    assert not lock.exists()


# ------------------------------------------------------------------------------------------------- lock


def foreign_lock(store: Path) -> Path:
    """The lock of a pass running on another node."""
    path = store.with_name(store.name + ".lock")
    path.write_text(json.dumps({"host": "gpu-node-17", "pid": 4242, "since": "2024-01-01T00:00:00"}))
    return path


def test_a_second_pass_on_a_locked_store_is_refused_and_leaves_the_first_passes_files(tiny, tmp_path):
    store = tmp_path / "locked.h5"
    parts = tmp_path / "locked.h5.parts"
    # What the first pass has written so far: one finished part and one part being written.
    with TeacherStore(tiny["store"]) as done:
        first, second = done.shard_names[:2]
        start, stop = done.shard_rows(first)
        arrays = [np.stack([done.read(v, start, stop)[i] for v in range(VIEWS)]) for i in (2, 0, 1)]
        store_module.write_part(parts / f"{first}.h5", done.spec, first, done.keys(start, stop),
                                done.chunks(start, stop), *arrays)
    (parts / f"{second}.h5.tmp-4242").write_bytes(b"half a part")
    lock = foreign_lock(store)
    before = {path.name: path.read_bytes() for path in [lock, *parts.iterdir()]}
    run = dict(seed=0, num_views=VIEWS, batch_size=4, progress=False)
    with pytest.raises(StoreError, match="being written by another teacher pass") as error:
        teacher_pass(tiny["shards"], store, load_ensemble(tiny["checkpoints"]), AUGMENT, **run)
    message = str(error.value)
    assert "\n" not in message
    for part in (str(store), "host gpu-node-17, pid 4242", str(lock), "teach.break_lock=true"):
        assert part in message
    assert {path.name: path.read_bytes() for path in [lock, *parts.iterdir()]} == before

    summary = teacher_pass(tiny["shards"], store, load_ensemble(tiny["checkpoints"]), AUGMENT, break_lock=True, **run)
    assert summary["parts_reused_by_this_rank"] == 1
    assert_same_store(store, tiny["store"])
    assert not parts.exists() and not lock.exists()


class LockWitness:
    """A teacher that records at each call whether the store's lock file exists, and raises at call `fail_at`."""

    num_classes = 527

    def __init__(self, lock: Path, fail_at: int | None = None) -> None:
        self.lock, self.fail_at, self.seen = lock, fail_at, []

    def __call__(self, mel_db: torch.Tensor) -> torch.Tensor:
        self.seen.append(self.lock.exists())
        if len(self.seen) == self.fail_at:
            raise RuntimeError("teacher crashed")
        return torch.zeros(mel_db.shape[0], self.num_classes)


def test_the_lock_is_held_while_a_pass_runs_and_removed_when_it_fails_or_ends(tmp_path):
    shards = make_shards(tmp_path / "shards", [1.0] * 4, 2)  # 2 shards; with 2 views, one batch of 4 each
    store = tmp_path / "store.h5"
    lock = tmp_path / "store.h5.lock"
    run = dict(seed=0, num_views=2, batch_size=4, progress=False)
    failing = LockWitness(lock, fail_at=2)
    with pytest.raises(RuntimeError, match="teacher crashed"):
        teacher_pass(shards, store, TeacherEnsemble([failing], sources=[{"file": "witness"}]), AUGMENT, **run)
    assert failing.seen == [True, True] and not lock.exists()
    assert [path.name for path in (tmp_path / "store.h5.parts").glob("*.h5")] == ["shard-000000.tar.h5"]
    working = LockWitness(lock)
    summary = teacher_pass(shards, store, TeacherEnsemble([working], sources=[{"file": "witness"}]), AUGMENT, **run)
    assert working.seen == [True] and summary["parts_reused_by_this_rank"] == 1
    assert store.exists() and not lock.exists()


def test_an_up_to_date_store_leaves_leftover_parts_to_the_pass_holding_the_lock(tiny, tmp_path, capsys):
    store = Path(shutil.copy(tiny["store"], tmp_path / "current.h5"))
    parts = tmp_path / "current.h5.parts"
    parts.mkdir()
    (parts / "shard-000000.tar.h5.tmp-4242").write_bytes(b"half a part")
    lock = foreign_lock(store)
    run = dict(seed=0, num_views=VIEWS, progress=False)
    teacher_pass(tiny["shards"], store, load_ensemble(tiny["checkpoints"]), AUGMENT, **run)
    assert "leaving" in capsys.readouterr().out and (parts / "shard-000000.tar.h5.tmp-4242").exists()
    lock.unlink()
    teacher_pass(tiny["shards"], store, load_ensemble(tiny["checkpoints"]), AUGMENT, **run)
    assert not parts.exists() and not lock.exists()


def _locked_rank_worker(rank: int, init_file: str, shards: str, store: str, checkpoints: list[str]) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                                         timeout=timedelta(seconds=60))
    try:
        teacher_pass(shards, store, load_ensemble(checkpoints), AUGMENT, seed=0, num_views=VIEWS, progress=False)
    except StoreError as error:
        Path(f"{store}.rank{rank}").write_text(str(error))
    finally:
        torch.distributed.destroy_process_group()


def test_a_locked_store_stops_every_rank_of_a_pass_before_it_starts(tiny, tmp_path):
    store = tmp_path / "two_ranks.h5"
    lock = foreign_lock(store)
    args = (str(tmp_path / "gloo_init"), str(tiny["shards"]), str(store), [str(p) for p in tiny["checkpoints"]])
    spawn_bounded(_locked_rank_worker, args, nprocs=2)
    for rank in range(2):  # rank 1 learns of rank 0's refusal before it writes anything
        assert "host gpu-node-17, pid 4242" in Path(f"{store}.rank{rank}").read_text()
    assert lock.exists() and not store.with_name(store.name + ".parts").exists()


# ------------------------------------------------------------------------------------------------- failing ranks


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_ddp_child_that_finds_the_store_current_starts_no_process_group(tiny, monkeypatch):
    # Lightning's DDP re-runs the app in child processes that have LOCAL_RANK and WORLD_SIZE but no RANK; they run
    # the stages again after the parent's pass and must find the store done without forming a process group.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    monkeypatch.delenv("RANK", raising=False)
    summary = teacher_pass(tiny["shards"], tiny["store"], load_ensemble(tiny["checkpoints"]), AUGMENT, seed=0,
                           num_views=VIEWS, progress=False)
    assert summary["rows_run_by_this_rank"] == 0 and not torch.distributed.is_initialized()


def launch_teach_ranks(tmp_path, ranks, world_size, shards, checkpoints, store, wait_s=90):
    """Run `python -m ced_train stages=[teach]` (teach.timeout_min=0.2) once per rank in `ranks` of `world_size`,
    torchrun-style (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); → {rank: (exit code, output)}, exit
    code None for a process still running after `wait_s` seconds (then killed)."""
    overrides = ["~local", "stages=[teach]", f"paths.root_dir={tmp_path}", f"data.train_shards={shards}",
                 f"teachers.checkpoints=[{','.join(map(str, checkpoints))}]", "teachers.name=pair", "teach.views=2",
                 "teach.num_workers=0", "teach.progress=false", "teach.timeout_min=0.2",
                 "augment.mixup_block_clips=2", f"store.path={store}"]
    port = free_port()
    processes = {}
    for rank in ranks:
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        with open(tmp_path / f"rank{rank}.log", "w") as log:
            command = [sys.executable, "-m", "ced_train", *overrides, f"hydra.run.dir={tmp_path}/run{rank}"]
            processes[rank] = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + wait_s
    codes = {}
    for rank, process in processes.items():
        try:
            codes[rank] = process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            codes[rank] = None
    for process in processes.values():
        if process.poll() is None:
            process.kill()
            process.wait()
    return {rank: (codes[rank], (tmp_path / f"rank{rank}.log").read_text()) for rank in ranks}


def test_a_rank_failing_on_a_corrupt_shard_ends_every_rank_of_the_pass(tiny, tmp_path):
    shards = make_shards(tmp_path / "shards", [1.0] * 6, 2)
    bad = read_manifest(shards).shards[1]  # rank 1's of 3 (shards[rank::3])
    with tarfile.open(bad.path) as tar:
        audio = next(member for member in tar if member.name.endswith(".flac"))
    with open(bad.path, "r+b") as handle:  # same size: the manifest's byte count still matches
        handle.seek(audio.offset_data)
        handle.write(bytes(64))
    store = tmp_path / "store.h5"
    results = launch_teach_ranks(tmp_path, [0, 1, 2], 3, shards, tiny["checkpoints"], store)
    for rank, (code, output) in results.items():
        assert code not in (0, None), f"rank {rank} exited with {code}:\n{output[-3000:]}"
    assert f"{bad.name}: sample" in results[1][1] and "does not decode" in results[1][1]
    for rank in (0, 2):  # the survivors say where to look
        assert "waiting for the other ranks failed" in results[rank][1], results[rank][1][-3000:]
    assert not store.exists() and not StoreLock.path_of(store).exists()
    finished = sorted(path.name for path in store.with_name("store.h5.parts").glob("*.h5"))
    assert finished == ["shard-000000.tar.h5", "shard-000002.tar.h5"]  # what a re-run reuses


def test_ranks_waiting_for_one_that_never_starts_fail_after_teach_timeout_min(tiny, tmp_path):
    store = tmp_path / "store.h5"
    results = launch_teach_ranks(tmp_path, [0, 1], 3, tiny["shards"], tiny["checkpoints"], store)
    expected = "process group of WORLD_SIZE=3 ranks could not be formed (teach.timeout_min=0.2"
    for rank, (code, output) in results.items():
        assert code not in (0, None), f"rank {rank} exited with {code}:\n{output[-3000:]}"
        assert expected in output, output[-3000:]
    assert not store.exists() and not StoreLock.path_of(store).exists()


# ------------------------------------------------------------------------------------------------- stage


def test_stage_teach_runs_from_the_composed_hydra_config(tiny, tmp_path):
    from hydra import compose, initialize_config_dir

    from ced_train.stages import teach

    checkpoints = ",".join(str(path) for path in tiny["checkpoints"])
    overrides = [
        "~local",
        f"paths.root_dir={tmp_path}",
        f"data.train_shards={tiny['shards']}",
        f"teachers.checkpoints=[{checkpoints}]",
        "teachers.name=pair",
        "teach.views=2",
        "teach.num_workers=0",
        "teach.progress=false",
        "augment.mixup_block_clips=4",
    ]
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    results = teach.run(cfg)
    assert results["store"] == str(tmp_path / "data" / "store" / "pair" / "synthetic.h5")
    summary = verify(results["store"], tiny["shards"], augment=AugmentConfig(mixup_block_clips=4))
    assert (summary["views"], summary["rows"]) == (2, CLIPS)


def test_slurm_tasks_without_a_process_group_leave_the_pass_to_task_zero(monkeypatch):
    from ced_train.stages.teach_ranks import init_distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_PROCID", "3")
    with pytest.raises(RuntimeError, match="SLURM task 3 of 8 without WORLD_SIZE/RANK: task 0 runs the pass alone"):
        init_distributed(torch.device("cpu"), timedelta(minutes=1))
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert init_distributed(torch.device("cpu"), timedelta(minutes=1)) == (0, 1)
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert init_distributed(torch.device("cpu"), timedelta(minutes=1)) == (0, 1)
