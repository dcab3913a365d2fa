"""The view dataset and its rendering: batch-independent views, fresh and replayed parameters, mixup partners,
sharding by rank/worker."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from ced_train.augment import AugmentConfig, ViewSampler, apply, fixed_length
from ced_train.data import read_manifest, read_shard
from ced_train.models.frontend import LogMelFrontEnd
from ced_train.rendering import ViewRenderer, collate_views
from ced_train.views import ViewDataset, collate_items
from helpers import make_shards

RENDER = ViewRenderer()

# Small blocks so a few clips make several mixup blocks; mixup always on to exercise partners.
AUGMENT = AugmentConfig(mixup_prob=1.0, mixup_block_clips=3)


def tensor_hash(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    # 7 clips in shards of 4 and 3: blocks of 3 leave a block of one clip (no partner possible) in the first shard.
    return make_shards(tmp_path_factory.mktemp("views") / "shards", [10, 3.5, 10, 12, 10, 0.8, 10], 4)


def collate_one(item: dict) -> dict:
    return collate_items([item])


def rendered(dataset, num_workers=0, batch_size=None) -> dict[tuple[str, int], str]:
    """(key, view) → hash of the rendered input, over a DataLoader with these settings (`batch_size`: the
    DataLoader's batches of items; a dataset with its own `batch_size` yields batches itself)."""
    collate = None if dataset.batch_size else collate_one if batch_size is None else collate_items
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate)
    hashes = {}
    for batch in loader:
        for key, view, mel_db in zip(batch["key"], batch["view"].tolist(), RENDER(batch["inputs"]), strict=True):
            assert (key, view) not in hashes, f"{key} view {view} was yielded twice"
            hashes[(key, view)] = tensor_hash(mel_db)
    return hashes


def test_rendered_views_do_not_depend_on_workers_batch_size_or_batch_mates(shards):
    sampler = ViewSampler(AUGMENT, seed=3)
    reference = rendered(ViewDataset(shards, sampler=sampler, views=[0, 1]))  # batches of one view
    assert len(reference) == 7 * 2
    assert len(set(reference.values())) == 7 * 2
    assert rendered(ViewDataset(shards, sampler=sampler, views=[0, 1]), num_workers=2, batch_size=3) == reference
    assert rendered(ViewDataset(shards, sampler=sampler, views=[0, 1], batch_size=5), num_workers=2) == reference
    assert rendered(ViewDataset(shards, sampler=sampler, views=[0, 1], batch_size=8)) == reference


def test_every_view_is_the_front_end_of_the_fixed_chunk_augmented_by_apply(shards):
    """The int16 chunks shipped by the workers and rendered in a batch give exactly the views of the float
    waveforms rendered one by one."""
    dataset = ViewDataset(shards, sampler=ViewSampler(AUGMENT, seed=1), views=[2])
    manifest = read_manifest(shards)
    clips = {key: clip for shard in manifest.shards for key, clip in read_shard(shard.path).items()}
    rows = {key: (shard, row) for shard in manifest.shards for row, key in enumerate(shard.keys)}
    front_end = LogMelFrontEnd()
    items = list(dataset)
    batch = RENDER(collate_views(items))
    assert batch.shape == (7, 64, 1001)
    for item, mel_db in zip(items, batch, strict=True):
        shard, _ = rows[item["key"]]
        partner_row = item["params"]["partner_row"]
        partner_key = shard.keys[partner_row] if partner_row >= 0 else item["key"]
        own, partner = (front_end(torch.from_numpy(fixed_length(clips[key].waveform, AUGMENT.clip_samples))[None])
                        for key in (item["key"], partner_key))
        params = {name: torch.tensor([value]) for name, value in item["params"].items()}
        assert torch.equal(mel_db, apply(own, params, partner, AUGMENT.mask_fill_db)[0])


def test_a_batch_ships_each_distinct_clip_once(shards):
    items = list(ViewDataset(shards, sampler=ViewSampler(AUGMENT, seed=0), views=[0, 1, 2]))
    inputs = collate_views(items)
    distinct = {(item["shard"], row) for item in items for row in (item["row"], item["partner_row"])}
    assert inputs.waveforms.shape == (7, AUGMENT.clip_samples) and inputs.waveforms.dtype == torch.int16
    assert len(distinct) == 7 and len(inputs) == 21
    for item, clip, partner in zip(items, inputs.clip, inputs.partner, strict=True):
        assert np.array_equal(inputs.waveforms[clip].numpy(), item["waveform"])
        assert np.array_equal(inputs.waveforms[partner].numpy(), item["partner_waveform"])


def test_mixup_partners_are_other_clips_of_the_same_block_of_the_same_shard(shards):
    dataset = ViewDataset(shards, sampler=ViewSampler(AUGMENT, seed=0), views=list(range(6)))
    partners = 0
    for item in dataset:
        partner_row = item["params"]["partner_row"]
        if partner_row >= 0:
            partners += 1
            assert partner_row != item["row"]
            assert partner_row // AUGMENT.mixup_block_clips == item["row"] // AUGMENT.mixup_block_clips
            assert item["labels"].sum() == pytest.approx(1.0, abs=1e-6)  # own and partner labels, mixed
        else:
            # The lone clip of the last block of a 4-clip shard has no partner to draw.
            assert item["row"] == 3
    assert partners > 0


def test_workers_split_whole_shards_without_overlap(shards):
    dataset = ViewDataset(shards, sampler=ViewSampler(AUGMENT, seed=0), views=[0])
    keys = [key for key, _ in rendered(dataset, num_workers=2, batch_size=2)]
    assert len(keys) == len(dataset)
    assert sorted(keys) == sorted(key for shard in read_manifest(shards).shards for key in shard.keys)


def test_disjoint_render_ranges_cover_the_epoch_order_once_and_render_like_the_whole(shards):
    dataset = ViewDataset(shards, sampler=ViewSampler(AUGMENT, seed=0), shuffle=True, seed=2)
    dataset.set_epoch(1)
    whole = list(dataset.render(0, dataset.num_rows))
    assert len(whole) == 7
    # Cuts inside mixup blocks and across the shard boundary.
    pieces = [item for start, stop in ((0, 2), (2, 5), (5, 7)) for item in dataset.render(start, stop)]
    assert [item["key"] for item in pieces] == [item["key"] for item in whole]
    assert [tensor_hash(mel_db) for mel_db in RENDER(collate_views(pieces))] == \
        [tensor_hash(mel_db) for mel_db in RENDER(collate_views(whole))]


def test_shuffle_permutes_clips_within_blocks_only(shards):
    plain = [(i["shard"], i["row"]) for i in ViewDataset(shards, sampler=ViewSampler(AUGMENT, 0))]
    orders = set()
    for epoch in range(4):
        dataset = ViewDataset(shards, sampler=ViewSampler(AUGMENT, 0), shuffle=True, seed=5)
        dataset.set_epoch(epoch)
        order = [(i["shard"], i["row"]) for i in dataset]
        assert sorted(order) == sorted(plain)
        # Within a shard, blocks come in order: the block index never decreases.
        for shard in {s for s, _ in order}:
            blocks = [row // AUGMENT.mixup_block_clips for s, row in order if s == shard]
            assert blocks == sorted(blocks)
        orders.add(tuple(order))
    assert len(orders) > 1


def test_fresh_student_views_change_with_the_epoch(shards):
    dataset = ViewDataset(shards, sampler=ViewSampler(AUGMENT, seed=0))
    first = rendered(dataset)
    dataset.set_epoch(1)
    second = rendered(dataset)
    assert {key for key, _ in first} == {key for key, _ in second}
    assert set(first.values()).isdisjoint(second.values())


def test_a_dataset_needs_a_store_or_a_sampler(shards):
    with pytest.raises(ValueError, match="store .* or a sampler"):
        ViewDataset(shards)


def test_rendering_does_not_depend_on_the_cpu_thread_count(shards):
    inputs = collate_views(list(ViewDataset(shards, sampler=ViewSampler(AUGMENT, seed=4), views=[0, 1])))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = RENDER(inputs)
        torch.set_num_threads(2)
        two = RENDER(inputs)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
