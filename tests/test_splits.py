"""How training data is split: ranks and DataLoader workers share the epoch's clips (not whole shards) in equal
batches, a resumed epoch continues after its trained batches, and training views are their own random stream."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from ced_train.augment import AugmentConfig, ViewSampler
from ced_train.lightning.data import EqualBatches, ViewsDataModule, collate_supervised
from ced_train.views import ViewDataset
from helpers import make_shards

AUGMENT = AugmentConfig(mixup_prob=1.0, mixup_block_clips=2, clip_samples=16000, time_mask_max_frames=20)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    # 13 clips in 5 unequal shards (3, 3, 3, 3, 1).
    return make_shards(tmp_path_factory.mktemp("splits") / "shards", [1.0] * 13, 3)


def batches_of(dataset: ViewDataset, rank: int, world_size: int, num_workers: int, epoch: int = 0,
               resume: tuple[int, int] | None = None) -> list[list[str]]:
    equal = EqualBatches(dataset, 2, rank, world_size, collate_supervised)
    equal.set_epoch(epoch)  # what its workers read when an epoch's iterator starts
    if resume is not None:
        equal.resume_at(*resume)
    return [batch.keys for batch in DataLoader(equal, batch_size=None, num_workers=num_workers)]


def test_three_ranks_with_more_workers_than_shards_get_equal_disjoint_batches(shards):
    dataset = ViewDataset(shards, sampler=ViewSampler(AUGMENT, 0, purpose="train"), shuffle=True, seed=3)
    per_rank = [batches_of(dataset, rank, 3, num_workers=3) for rank in range(3)]
    # 13 // (3 ranks x 2) = 2 batches of 2 on every rank, although the ranks would hold 2, 2 and 1 shards.
    assert [len(batches) for batches in per_rank] == [2, 2, 2]
    assert all(len(batch) == 2 for batches in per_rank for batch in batches)
    keys = [key for batches in per_rank for batch in batches for key in batch]
    assert len(set(keys)) == len(keys) == 12  # one clip left out: fewer than world_size x batch_size
    # The epoch's order changes with the epoch, and so does the left-out clip.
    later = [key for rank in range(3) for batch in batches_of(dataset, rank, 3, 3, epoch=1) for key in batch]
    assert later != keys and len(set(later)) == 12


def test_the_split_does_not_depend_on_the_worker_count(shards):
    dataset = ViewDataset(shards, sampler=ViewSampler(AUGMENT, 0, purpose="train"), shuffle=True, seed=3)
    one = sorted(sum(batches_of(dataset, 1, 2, num_workers=0), []))
    four = sorted(sum(batches_of(dataset, 1, 2, num_workers=4), []))
    assert one == four


def test_a_resumed_epoch_yields_exactly_the_batches_after_the_trained_ones(shards):
    dataset = ViewDataset(shards, sampler=ViewSampler(AUGMENT, 0, purpose="train"), shuffle=True, seed=3)
    full = batches_of(dataset, 0, 1, num_workers=2, epoch=1)
    assert len(full) == 6
    for done in range(len(full) + 1):
        assert batches_of(dataset, 0, 1, num_workers=2, epoch=1, resume=(1, done)) == full[done:]
    # The skip belongs to the resumed epoch only.
    assert len(batches_of(dataset, 0, 1, num_workers=2, epoch=2, resume=(1, 4))) == 6


def test_a_datamodule_accepts_more_workers_than_shards(shards):
    dm = ViewsDataModule(str(shards), str(shards), batch_size=4, eval_batch_size=4, num_workers=8,
                         augment=AUGMENT, fresh_seed=0)
    dm.setup("fit")
    assert dm.num_batches == 3
    assert sum(len(batch.keys) for batch in dm.train_dataloader()) == 12


def test_supervised_training_views_are_never_the_teacher_pass_views(shards):
    """`train` seeds member 0 with `seed` and the teacher pass uses `teach.seed = ${seed}`: equal seeds must still
    give other views, or a teacher would be scored on inputs it was trained on."""
    seed, views = 0, 4
    dm = ViewsDataModule(str(shards), str(shards), batch_size=1, eval_batch_size=4, augment=AUGMENT, fresh_seed=seed)
    dm.setup("fit")
    teacher = ViewDataset(shards, sampler=ViewSampler(AUGMENT, seed), views=range(views))
    stored = {(item["key"], item["view"]): item["params"] for item in teacher}
    compared = 0
    for epoch in range(views):
        dm.set_epoch(epoch)
        for item in dm.train_set:
            assert item["params"] != stored[(item["key"], epoch)], (item["key"], epoch)
            compared += 1
    assert compared == views * 13
