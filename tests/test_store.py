"""The store format on its own: spec, part writer, merge, reader, dense targets (checks against shards are in
tests/test_teach.py)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from ced_train.augment import VIEW_PARAMS_DTYPE, AugmentConfig, sample_views
from ced_train.store import (
    CHUNK_CLIPS,
    FORMAT_VERSION,
    StoreError,
    StoreLock,
    StoreLockedError,
    StoreSpec,
    TeacherStore,
    merge_parts,
    part_is_complete,
    topk_to_dense,
    write_part,
)

REPO = Path(__file__).resolve().parents[1]
SPEC = StoreSpec("f" * 64, AugmentConfig(), 0, ({"file": "a.pt", "sha256": "0" * 64},), "probs", 5, 2, 527)


def shard_arrays(keys: list[str], seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    params = np.stack([sample_views(SPEC.augment, 0, keys, [v] * len(keys), list(range(len(keys))), len(keys))
                       for v in range(SPEC.num_views)])
    values = -np.sort(-rng.random((SPEC.num_views, len(keys), SPEC.top_k)), axis=-1)
    indices = np.stack([[rng.permutation(527)[: SPEC.top_k] for _ in keys] for _ in range(SPEC.num_views)])
    return params, values, indices


@pytest.fixture
def parts(tmp_path):
    written = {}
    # a.tar: sample a0 of two chunks, a1 of one; b.tar: two samples of one chunk.
    for shard, keys, chunks in (("a.tar", ["a0", "a0", "a1"], [0, 1, 0]), ("b.tar", ["b0", "b1"], [0, 0])):
        arrays = shard_arrays(keys, seed=len(keys))
        path = write_part(tmp_path / "parts" / f"{shard}.h5", SPEC, shard, keys, np.array(chunks), *arrays)
        written[shard] = (path, keys, arrays)
    return written


def test_merged_store_reads_back_exactly_what_the_parts_held(parts, tmp_path):
    path = merge_parts(tmp_path / "store.h5", SPEC, [parts["a.tar"][0], parts["b.tar"][0]])
    assert not list(tmp_path.glob("*.tmp-*"))
    with TeacherStore(path) as store:
        assert (store.num_rows, store.num_views, store.top_k, store.spec) == (5, 2, 5, SPEC)
        assert store.keys() == ["a0", "a0", "a1", "b0", "b1"]
        assert store.chunks().tolist() == [0, 1, 0, 0, 0]
        for shard, (_, keys, (params, values, indices)) in parts.items():
            start, stop = store.shard_rows(shard)
            assert store.keys(start, stop) == keys
            for view in range(2):
                got_values, got_indices, got_params = store.read(view, start, stop)
                assert np.array_equal(got_values, values[view].astype(np.float16))
                assert np.array_equal(got_indices, indices[view])
                assert np.array_equal(got_params, params[view])
        with pytest.raises(StoreError, match="no shard"):
            store.shard_rows("c.tar")


def test_layout_is_view_major_with_chunks_of_one_view_of_consecutive_clips(parts, tmp_path):
    path = merge_parts(tmp_path / "store.h5", SPEC, [parts["a.tar"][0], parts["b.tar"][0]])
    with h5py.File(path, "r") as file:
        assert file["topk_values"].dtype == np.float16 and file["topk_indices"].dtype == np.int16
        assert file["topk_values"].chunks == (1, min(5, CHUNK_CLIPS), 5)
        assert file["view_params"].dtype == VIEW_PARAMS_DTYPE
        assert file.attrs["fingerprint"] == SPEC.fingerprint()


def test_a_store_reader_pickles_for_data_loader_workers(parts, tmp_path):
    path = merge_parts(tmp_path / "store.h5", SPEC, [parts["a.tar"][0], parts["b.tar"][0]])
    store = TeacherStore(path)
    clone = pickle.loads(pickle.dumps(store))
    assert np.array_equal(clone.read(1, 0, 5)[1], store.read(1, 0, 5)[1])


def test_a_part_of_another_pass_is_refused_not_reused(parts):
    path, keys, _ = parts["a.tar"]
    assert part_is_complete(path, SPEC, "a.tar", 3)
    assert not part_is_complete(path.with_name("missing.h5"), SPEC, "a.tar", 3)
    with pytest.raises(StoreError, match="seed: 0 != 1"):
        part_is_complete(path, dataclasses.replace(SPEC, seed=1), "a.tar", 3)
    with pytest.raises(StoreError, match="expected b.tar"):
        part_is_complete(path, SPEC, "b.tar", 3)
    with pytest.raises(StoreError, match="fingerprint"):
        merge_parts(path.with_name("x.h5"), dataclasses.replace(SPEC, top_k=4), [path])


def test_spec_fingerprint_covers_every_setting():
    changes = {"manifest_fingerprint": "e" * 64, "augment": AugmentConfig(mixup_alpha=0.3), "seed": 1,
               "teachers": ({"file": "b.pt", "sha256": "1" * 64},), "averaging": "logits", "top_k": 4,
               "num_views": 3, "num_classes": 10, "precision": "bfloat16"}
    fingerprints = {dataclasses.replace(SPEC, **{name: value}).fingerprint() for name, value in changes.items()}
    assert len(fingerprints | {SPEC.fingerprint()}) == len(changes) + 1
    assert StoreSpec.from_attrs(SPEC.to_attrs()) == SPEC


def test_a_spec_of_unrecorded_precision_keeps_the_fingerprint_of_stores_written_before_it_was_recorded():
    # SPEC's fingerprint as the code before `precision` computed it: those stores still verify, and students
    # distilled from them keep their fingerprints.
    assert SPEC.precision is None and SPEC.fingerprint() == "cf28f6c9452c7e7f"
    assert "precision" not in SPEC.to_attrs() and StoreSpec.from_attrs(SPEC.to_attrs()) == SPEC
    assert dataclasses.replace(SPEC, precision="float16").differences(SPEC) == ["precision: 'float16' != not recorded"]

def test_spec_refuses_classes_beyond_int16_and_k_beyond_the_classes():
    with pytest.raises(ValueError, match="int16"):
        dataclasses.replace(SPEC, num_classes=40000)
    with pytest.raises(ValueError, match="top_k=600"):
        dataclasses.replace(SPEC, top_k=600)
    with pytest.raises(ValueError, match="precision='fp16'"):
        dataclasses.replace(SPEC, precision="fp16")


def test_topk_to_dense_places_values_at_their_classes():
    dense = topk_to_dense(np.array([[0.9, 0.5]], np.float16), np.array([[3, 0]], np.int16), 4)
    assert np.array_equal(dense, np.array([[0.5, 0.0, 0.0, 0.9]], np.float32).astype(np.float16).astype(np.float32))
    assert topk_to_dense(np.array([[0.9]]), np.array([[1]]), 3, fill=0.01)[0, 0] == pytest.approx(0.01)


def test_a_store_of_another_format_version_is_refused_in_one_line(parts, tmp_path):
    path = merge_parts(tmp_path / "store.h5", SPEC, [parts["a.tar"][0], parts["b.tar"][0]])
    with h5py.File(path, "r+") as file:
        file.attrs["format_version"] = FORMAT_VERSION - 1
    expected = f"store format version {FORMAT_VERSION - 1}, this code reads {FORMAT_VERSION}"
    with pytest.raises(StoreError, match=expected) as error:
        TeacherStore(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)
    assert "re-run the teacher pass with teach.overwrite=true" in str(error.value)


# A process that keeps files open for writing with HDF5's default (locking) access, until its stdin closes.
HOLD_FOR_WRITING = """
import sys, h5py
files = [h5py.File(path, "r+") for path in sys.argv[1:]]
print("holding", flush=True)
sys.stdin.read()
"""


def test_readers_open_store_and_parts_without_hdf5_file_locks(parts, tmp_path, monkeypatch):
    # With locks, HDF5 refuses to open a file that another process holds for writing ("unable to lock file"); a
    # reader that takes none also works where the file system has no working locks (Lustre, NFS).
    monkeypatch.delenv("HDF5_USE_FILE_LOCKING", raising=False)
    store = merge_parts(tmp_path / "store.h5", SPEC, [parts["a.tar"][0], parts["b.tar"][0]])
    part = parts["a.tar"][0]
    env = {name: value for name, value in os.environ.items() if name != "HDF5_USE_FILE_LOCKING"}
    holder = subprocess.Popen([sys.executable, "-c", HOLD_FOR_WRITING, str(store), str(part)], env=env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(OSError, match="lock"):  # what a locking reader meets
            h5py.File(store, "r")
        with TeacherStore(store) as reader:
            assert np.array_equal(reader.read(1, 0, 3)[1], parts["a.tar"][2][2][1])
        assert part_is_complete(part, SPEC, "a.tar", 3)
        merged = merge_parts(tmp_path / "again.h5", SPEC, [part, parts["b.tar"][0]])
        with TeacherStore(merged) as reader:
            assert reader.keys() == ["a0", "a0", "a1", "b0", "b1"]
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


# ------------------------------------------------------------------------------------------------- pass lock

# A second process that takes a store's lock and keeps it until its stdin closes (or it is killed).
HOLD_LOCK = """
import sys
from ced_train.store import StoreLock

lock = StoreLock.acquire(sys.argv[1])
print("locked", flush=True)
sys.stdin.read()
lock.release()
"""


def test_a_store_lock_held_by_a_live_process_is_refused_and_one_left_by_a_killed_process_is_taken(tmp_path, capsys):
    store = tmp_path / "store.h5"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(store)], cwd=REPO, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreLockedError) as error:
            StoreLock.acquire(store)
        message = str(error.value)
        assert "\n" not in message
        for part in (str(store), f"{store}.lock", f"host {socket.gethostname()}", f"pid {holder.pid}",
                     "teach.break_lock=true"):
            assert part in message
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert store.with_name("store.h5.lock").exists()  # a killed holder leaves its lock behind
    with StoreLock.acquire(store) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
        assert "its process is gone" in capsys.readouterr().out
    assert not lock.path.exists()


def test_a_store_lock_of_another_host_is_only_taken_with_break_lock(tmp_path):
    store = tmp_path / "store.h5"
    lock_file = tmp_path / "store.h5.lock"
    lock_file.write_text(json.dumps({"host": "gpu-node-17", "pid": 4242, "since": "2024-01-01T00:00:00"}))
    with pytest.raises(StoreLockedError, match="host gpu-node-17, pid 4242, since 2024-01-01T00:00:00"):
        StoreLock.acquire(store)
    assert json.loads(lock_file.read_text())["host"] == "gpu-node-17"
    lock = StoreLock.acquire(store, break_lock=True)
    assert json.loads(lock_file.read_text())["host"] == socket.gethostname()
    # A pass whose lock was broken and taken by another leaves the new holder's lock in place.
    successor = StoreLock.acquire(store, break_lock=True)
    lock.release()
    assert json.loads(lock_file.read_text()) == successor.holder
    successor.release()
    assert not lock_file.exists()


def _contend_for_locks(stores: list[str], barrier, results) -> None:
    """Try to take each store's lock together with the other contenders; a winner holds it until all have tried."""
    for store in stores:
        barrier.wait()
        try:
            lock = StoreLock.acquire(store)
        except StoreLockedError:
            lock = None
        results.put((store, lock is not None))
        barrier.wait()
        if lock is not None:
            lock.release()


def dead_holder() -> dict:
    """The lock holder of a pass on this host whose process is gone."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    return {"host": socket.gethostname(), "pid": dead.pid, "pid_namespace": os.readlink("/proc/self/ns/pid"),
            "since": "2024-01-01T00:00:00", "token": "0123456789abcdef"}


def test_passes_breaking_the_same_stale_lock_together_leave_exactly_one_holder(tmp_path):
    holder = dead_holder()
    stores = [str(tmp_path / f"round{round_}.h5") for round_ in range(200)]
    for store in stores:
        StoreLock.path_of(store).write_text(json.dumps(holder))
    context = multiprocessing.get_context("spawn")
    contenders = 5
    barrier, results = context.Barrier(contenders), context.Queue()
    processes = [context.Process(target=_contend_for_locks, args=(stores, barrier, results))
                 for _ in range(contenders)]
    for process in processes:
        process.start()
    try:
        winners = {store: 0 for store in stores}
        for _ in range(contenders * len(stores)):
            store, won = results.get(timeout=120)
            winners[store] += won
    finally:
        for process in processes:
            process.join(timeout=30)
            process.kill()
    assert winners == {store: 1 for store in stores}
    assert sorted(path.name for path in tmp_path.iterdir()) == []  # every winner released; nothing else is left


def test_a_stale_lock_that_another_pass_is_removing_is_left_to_it(tmp_path):
    store = tmp_path / "store.h5"
    content = json.dumps(dead_holder()).encode()
    StoreLock.path_of(store).write_bytes(content)
    claim = tmp_path / f"store.h5.lock.break-{hashlib.sha256(content).hexdigest()[:16]}"
    claim.touch()
    with pytest.raises(StoreLockedError, match="another teacher pass is removing its stale lock") as error:
        StoreLock.acquire(store)
    assert str(claim) in str(error.value) and "\n" not in str(error.value)
    assert StoreLock.path_of(store).read_bytes() == content and claim.exists()
    claim.unlink()
    with StoreLock.acquire(store) as lock:
        assert lock.holder["pid"] == os.getpid()
    assert list(tmp_path.iterdir()) == []
