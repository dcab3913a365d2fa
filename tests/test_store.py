"""The store format on its own: spec, part writer, merge, reader, dense targets (checks against shards are in
tests/test_teach.py)."""

from __future__ import annotations

import dataclasses
import pickle

import h5py
import numpy as np
import pytest

from ced_train.augment import VIEW_PARAMS_DTYPE, AugmentConfig, sample_views
from ced_train.store import (
    CHUNK_CLIPS,
    StoreError,
    StoreSpec,
    TeacherStore,
    merge_parts,
    part_is_complete,
    topk_to_dense,
    write_part,
)

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
    for shard, count in (("a.tar", 3), ("b.tar", 2)):
        keys = [f"{shard[0]}{i}" for i in range(count)]
        arrays = shard_arrays(keys, seed=count)
        path = write_part(tmp_path / "parts" / f"{shard}.h5", SPEC, shard, keys, *arrays)
        written[shard] = (path, keys, arrays)
    return written


def test_merged_store_reads_back_exactly_what_the_parts_held(parts, tmp_path):
    path = merge_parts(tmp_path / "store.h5", SPEC, [parts["a.tar"][0], parts["b.tar"][0]])
    assert not list(tmp_path.glob("*.tmp-*"))
    with TeacherStore(path) as store:
        assert (store.num_clips, store.num_views, store.top_k, store.spec) == (5, 2, 5, SPEC)
        assert store.keys() == ["a0", "a1", "a2", "b0", "b1"]
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
               "num_views": 3, "num_classes": 10}
    fingerprints = {dataclasses.replace(SPEC, **{name: value}).fingerprint() for name, value in changes.items()}
    assert len(fingerprints | {SPEC.fingerprint()}) == len(changes) + 1
    assert StoreSpec.from_attrs(SPEC.to_attrs()) == SPEC


def test_spec_refuses_classes_beyond_int16_and_k_beyond_the_classes():
    with pytest.raises(ValueError, match="int16"):
        dataclasses.replace(SPEC, num_classes=40000)
    with pytest.raises(ValueError, match="top_k=600"):
        dataclasses.replace(SPEC, top_k=600)


def test_topk_to_dense_places_values_at_their_classes():
    dense = topk_to_dense(np.array([[0.9, 0.5]], np.float16), np.array([[3, 0]], np.int16), 4)
    assert np.array_equal(dense, np.array([[0.5, 0.0, 0.0, 0.9]], np.float32).astype(np.float16).astype(np.float32))
    assert topk_to_dense(np.array([[0.9]]), np.array([[1]]), 3, fill=0.01)[0, 0] == pytest.approx(0.01)
