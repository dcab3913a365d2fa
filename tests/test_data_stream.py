import functools
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ced_train.data import ClipStream, collate_clips, iter_shard, read_manifest


@pytest.fixture()
def manifest(synthetic_train_shards):
    return read_manifest(synthetic_train_shards)


def stored_keys(manifest):
    return [key for shard in manifest.shards for key in shard.keys]


def keys_of(stream):
    return [clip.key for clip in stream]


def test_unshuffled_stream_yields_every_clip_once_in_stored_order_as_torch(manifest):
    stream = ClipStream(manifest, shuffle_shards=False, shuffle_buffer=0)

    clips = list(stream)

    assert [c.key for c in clips] == stored_keys(manifest)
    first = next(iter_shard(manifest.shards[0].path))
    assert isinstance(clips[0].waveform, torch.Tensor) and clips[0].waveform.dtype == torch.float32
    np.testing.assert_array_equal(clips[0].waveform.numpy(), first.waveform)
    assert clips[0].labels == first.labels and clips[0].shard == manifest.shards[0].name


def test_shuffling_is_seeded_per_epoch_and_keeps_every_clip(manifest):
    stream = ClipStream(manifest, shuffle_shards=True, shuffle_buffer=10, seed=7)
    epoch0 = keys_of(stream)
    assert keys_of(stream) == epoch0  # same seed and epoch: same order
    stream.set_epoch(1)
    epoch1 = keys_of(stream)

    assert sorted(epoch0) == sorted(epoch1) == sorted(stored_keys(manifest))
    assert epoch0 != epoch1 and epoch0 != stored_keys(manifest)
    assert keys_of(ClipStream(manifest, shuffle_buffer=10, seed=8)) != epoch0


def test_ranks_get_disjoint_shards_that_cover_the_dataset(manifest, monkeypatch):
    per_rank = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        per_rank.append(keys_of(ClipStream(manifest, shuffle_buffer=4, seed=3)))

    assert per_rank[0] and per_rank[1] and not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(stored_keys(manifest))
    shards_of = manifest.shard_of_key()
    assert not {shards_of[k] for k in per_rank[0]} & {shards_of[k] for k in per_rank[1]}


def test_dataloader_workers_split_shards_and_batches_pad_to_the_longest(manifest):
    stream = ClipStream(manifest, shuffle_buffer=4, seed=0)
    loader = DataLoader(stream, batch_size=4, num_workers=2,
                        collate_fn=functools.partial(collate_clips, num_classes=manifest.num_classes))

    batches = list(loader)

    keys = [key for batch in batches for key in batch.keys]
    assert sorted(keys) == sorted(stored_keys(manifest))
    for batch in batches:
        assert batch.waveform.shape == (len(batch), int(batch.lengths.max()))
        assert batch.labels.shape == (len(batch), 527) and batch.lengths.dtype == torch.int64


@pytest.mark.skipif(sys.platform != "linux", reason="relies on fork-started DataLoader workers for speed")
def test_set_epoch_reaches_persistent_workers(manifest):
    stream = ClipStream(manifest, shuffle_shards=True, shuffle_buffer=8, seed=0)
    loader = DataLoader(stream, batch_size=None, num_workers=1, persistent_workers=True)
    orders = []
    for epoch in range(3):
        stream.set_epoch(epoch)
        orders.append([clip.key for clip in loader])
    expected = []
    for epoch in range(3):
        stream.set_epoch(epoch)
        expected.append(keys_of(stream))
    assert orders == expected and orders[0] != orders[1]


def test_collate_pads_with_zeros_and_builds_multi_hot_labels():
    clips = [{"key": "a", "waveform": np.ones(3, np.float32), "labels": [0, 2], "meta": {}, "shard": "s0"},
             {"key": "b", "waveform": torch.full((5,), 0.5), "labels": [], "meta": {"x": 1}, "shard": "s1"}]

    batch = collate_clips(clips, num_classes=4)

    torch.testing.assert_close(batch.waveform, torch.tensor([[1, 1, 1, 0, 0], [0.5] * 5]))
    torch.testing.assert_close(batch.lengths, torch.tensor([3, 5]))
    torch.testing.assert_close(batch.labels, torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 0]]))
    assert batch.keys == ["a", "b"] and batch.shards == ["s0", "s1"] and batch.meta[1] == {"x": 1}
    moved = batch.to("cpu")
    assert moved.keys == batch.keys and moved.waveform.device.type == "cpu"


def test_collate_rejects_bad_inputs_naming_the_clip():
    with pytest.raises(ValueError, match="empty"):
        collate_clips([], num_classes=4)
    clip = {"key": "odd", "waveform": np.zeros(3, np.float32), "labels": [4], "meta": {}, "shard": "s"}
    with pytest.raises(ValueError, match="'odd'.*label index 4"):
        collate_clips([clip], num_classes=4)


def test_stream_needs_shards_and_a_valid_buffer(tmp_path):
    with pytest.raises(ValueError, match="at least one shard"):
        ClipStream([])
    with pytest.raises(ValueError, match="shuffle_buffer"):
        ClipStream([tmp_path / "x.tar"], shuffle_buffer=-1)
