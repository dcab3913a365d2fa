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
    stream = ClipStream(manifest)

    clips = list(stream)

    assert [c.key for c in clips] == stored_keys(manifest) and stream.rank_items == len(clips)
    first = next(iter_shard(manifest.shards[0].path))
    assert isinstance(clips[0].waveform, torch.Tensor) and clips[0].waveform.dtype == torch.float32
    np.testing.assert_array_equal(clips[0].waveform.numpy(), first.waveform)
    assert clips[0].labels == first.labels and clips[0].shard == manifest.shards[0].name


def test_iter_shard_decodes_a_row_range(manifest):
    shard = manifest.shards[0]
    assert [c.key for c in iter_shard(shard.path, 2, 5)] == list(shard.keys[2:5])
    assert [c.key for c in iter_shard(shard.path, 6)] == list(shard.keys[6:])


def test_shuffling_is_seeded_per_epoch_and_keeps_every_clip(manifest):
    stream = ClipStream(manifest, shuffle_shards=True, shuffle_buffer=10, seed=7)
    epoch0 = keys_of(stream)
    assert keys_of(stream) == epoch0  # same seed and epoch: same order
    stream.set_epoch(1)
    epoch1 = keys_of(stream)

    assert sorted(epoch0) == sorted(epoch1) == sorted(stored_keys(manifest))
    assert epoch0 != epoch1 and epoch0 != stored_keys(manifest)
    assert keys_of(ClipStream(manifest, shuffle_shards=True, shuffle_buffer=10, seed=8)) != epoch0


def loader_batches(stream, manifest, batch_size, num_workers):
    return list(DataLoader(stream, batch_size=batch_size, num_workers=num_workers,
                           collate_fn=functools.partial(collate_clips, num_classes=manifest.num_classes)))


def test_more_ranks_and_workers_than_shards_split_clips_each_read_once(manifest):
    # 21 clips in 3 shards, 4 ranks x 2 workers: whole-shard splitting would leave ranks empty.
    assert len(manifest.shards) == 3
    per_rank = []
    for rank in range(4):
        stream = ClipStream(manifest, rank=rank, world_size=4)
        per_rank.append([key for batch in loader_batches(stream, manifest, 2, 2) for key in batch.keys])
        assert len(per_rank[-1]) == stream.rank_items
    assert [len(keys) for keys in per_rank] == [6, 5, 5, 5]
    assert sorted(key for keys in per_rank for key in keys) == sorted(stored_keys(manifest))


def test_padding_gives_every_rank_the_same_batches_and_is_marked(manifest):
    batch_counts, real = [], []
    for rank in range(4):
        batches = loader_batches(ClipStream(manifest, rank=rank, world_size=4, pad=True), manifest, 2, 2)
        batch_counts.append(len(batches))
        for batch in batches:
            assert batch.padding.dtype == torch.bool and len(batch.padding) == len(batch)
            assert all(key == "" for key, pad in zip(batch.keys, batch.padding) if pad)
            assert not batch.labels[batch.padding].any()
            real += [key for key, pad in zip(batch.keys, batch.padding) if not pad]
    # ceil(21 / 4) = 6 items per rank in 2 workers of 3: 2 batches each, on every rank.
    assert batch_counts == [4, 4, 4, 4]
    assert sorted(real) == sorted(stored_keys(manifest))


def test_dataloader_workers_split_clips_and_batches_pad_to_the_longest(manifest):
    stream = ClipStream(manifest, shuffle_buffer=4, seed=0)
    batches = loader_batches(stream, manifest, 4, 2)

    keys = [key for batch in batches for key in batch.keys]
    assert sorted(keys) == sorted(stored_keys(manifest))
    for batch in batches:
        assert batch.waveform.shape == (len(batch), int(batch.lengths.max()))
        assert batch.labels.shape == (len(batch), 527) and batch.lengths.dtype == torch.int64
        assert not batch.padding.any()


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


def test_stream_needs_a_valid_buffer_and_rank(manifest):
    with pytest.raises(ValueError, match="shuffle_buffer"):
        ClipStream(manifest, shuffle_buffer=-1)
    with pytest.raises(ValueError, match="rank 2 outside 0..1"):
        ClipStream(manifest, rank=2, world_size=2)
