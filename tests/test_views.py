"""The view dataset: per-clip rendering, fresh and replayed parameters, mixup partners, sharding by rank/worker."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from ced_train.augment import AugmentConfig, ViewSampler, apply, params_from_columns
from ced_train.data import read_manifest
from ced_train.views import ViewDataset
from helpers import make_shards

# Small blocks so a few clips make several mixup blocks; mixup always on to exercise partners.
AUGMENT = AugmentConfig(mixup_prob=1.0, mixup_block_clips=3)


def tensor_hash(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    # 7 clips in shards of 4 and 3: blocks of 3 leave a block of one clip (no partner possible) in the first shard.
    return make_shards(tmp_path_factory.mktemp("views") / "shards", [10, 3.5, 10, 12, 10, 0.8, 10], 4)


def rendered(dataset, num_workers=0, batch_size=None) -> dict[tuple[str, int], str]:
    """(key, view) → hash of the rendered input, over a DataLoader with these settings."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    hashes = {}
    for batch in loader:
        if isinstance(batch["key"], str):  # single items
            batch = {"key": [batch["key"]], "view": [batch["view"]], "mel_db": batch["mel_db"][None]}
        for i, key in enumerate(batch["key"]):
            view = int(batch["view"][i])
            assert (key, view) not in hashes, f"{key} view {view} was yielded twice"
            hashes[(key, view)] = tensor_hash(batch["mel_db"][i])
    return hashes


def test_fresh_views_do_not_depend_on_workers_or_batch_size(shards):
    sampler = ViewSampler(AUGMENT, seed=3)
    reference = rendered(ViewDataset(shards, sampler=sampler, views=[0, 1]))
    assert len(reference) == 7 * 2
    assert rendered(ViewDataset(shards, sampler=sampler, views=[0, 1]), num_workers=2, batch_size=3) == reference
    assert rendered(ViewDataset(shards, sampler=sampler, views=[0, 1], batch_size=5), num_workers=2) == reference


def test_every_view_is_the_front_end_of_the_fixed_chunk_augmented_by_apply(shards):
    dataset = ViewDataset(shards, sampler=ViewSampler(AUGMENT, seed=1), views=[2])
    manifest = read_manifest(shards)
    from ced_train.data import read_shard

    clips = {key: clip for shard in manifest.shards for key, clip in read_shard(shard.path).items()}
    rows = {key: (shard, row) for shard in manifest.shards for row, key in enumerate(shard.keys)}
    for item in dataset:
        shard, row = rows[item["key"]]
        params = params_from_columns({k: [v] for k, v in item["params"].items()})
        partner_row = int(params["partner_row"][0])
        partner_key = shard.keys[partner_row] if partner_row >= 0 else item["key"]
        own = dataset.log_mel(clips[item["key"]].waveform)[None]
        partner = dataset.log_mel(clips[partner_key].waveform)[None]
        assert torch.equal(item["mel_db"], apply(own, params, partner, AUGMENT.mask_fill_db)[0])
        assert item["mel_db"].shape == (64, 1001)


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
    whole = [(item["key"], tensor_hash(item["mel_db"])) for item in dataset.render(0, dataset.num_clips)]
    assert len(whole) == 7
    # Cuts inside mixup blocks and across the shard boundary.
    pieces = [item for start, stop in ((0, 2), (2, 5), (5, 7)) for item in dataset.render(start, stop)]
    assert [(item["key"], tensor_hash(item["mel_db"])) for item in pieces] == whole


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
