"""The LightningDataModule of both training stages: rendered training views (`ced_train.views.ViewDataset`) and
labelled full-length validation clips (`ced_train.data.ClipStream`).

Training reads one view per clip per epoch: with a teacher store, view `epoch % V` with its stored augmentation
(replay, consistent) or fresh parameters against the same stored targets (`consistent=False`); without a store,
fresh parameters and the clips' labels (supervised). Every rank runs the same number of batches per epoch (DDP needs
it; ranks hold whole shards, so their clip counts differ): see `EqualBatches`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from itertools import islice

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ced_train.augment import AugmentConfig, ViewSampler
from ced_train.data import ClipStream, collate_clips, read_manifest
from ced_train.lightning.batches import DistillBatch, SupervisedBatch
from ced_train.store import TeacherStore
from ced_train.views import ViewDataset


def collate_supervised(items: list[dict]) -> SupervisedBatch:
    return SupervisedBatch(
        mel_db=torch.stack([item["mel_db"] for item in items]),
        labels=torch.stack([item["labels"] for item in items]),
        keys=[item["key"] for item in items],
    )


def collate_distill(items: list[dict]) -> DistillBatch:
    """Stored targets only: the items' labels are left behind, so distillation never sees them."""
    return DistillBatch(
        mel_db=torch.stack([item["mel_db"] for item in items]),
        topk_values=torch.stack([item["topk_values"] for item in items]),
        topk_indices=torch.stack([item["topk_indices"] for item in items]),
        views=torch.tensor([item["view"] for item in items]),
        keys=[item["key"] for item in items],
    )


class EqualBatches(IterableDataset):
    """Exactly `num_batches` batches of `batch_size` items per epoch from `dataset` on every rank.

    DataLoader workers take turns, so worker `w` of `W` yields `num_batches // W` batches plus one if
    `w < num_batches % W`. A worker whose shards run out before its share starts them again (a few clips seen twice
    in that epoch); one with more stops early (a few clips skipped, others next epoch as the shard order changes).
    Use with `DataLoader(batch_size=None)`; `len()` is `num_batches`.
    """

    def __init__(self, dataset: ViewDataset, batch_size: int, num_batches: int, collate: Callable[[list], object]):
        super().__init__()
        self.dataset = dataset
        self.batch_size = batch_size
        self.num_batches = num_batches
        self.collate = collate

    def __len__(self) -> int:
        return self.num_batches

    def _items(self) -> Iterator[dict]:
        while True:
            empty = True
            for item in self.dataset:
                empty = False
                yield item
            if empty:
                raise RuntimeError("a DataLoader worker got no training shards: lower data.num_workers")

    def __iter__(self) -> Iterator[object]:
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        share = self.num_batches // num_workers + (worker_id < self.num_batches % num_workers)
        items = self._items()
        for _ in range(share):
            yield self.collate(list(islice(items, self.batch_size)))


class ViewsDataModule(pl.LightningDataModule):
    """Training views and validation clips.

    Args:
        train_shards, val_shards: shard directories (validation shards must be labelled).
        batch_size: training clips per batch on each rank; eval_batch_size: validation clips per batch.
        num_workers: DataLoader workers (each renders whole shards; at most the shards per rank).
        seed: seed of the shard and clip shuffles.
        store: teacher store (distillation) or None (supervised training on labels).
        consistent: with a store, replay its views (True) or draw fresh ones with `fresh_seed` (False).
        augment: the augmentation of fresh views without a store (supervised training).
        fresh_seed: seed of fresh views; must differ from the store's seed.
    """

    def __init__(
        self,
        train_shards: str,
        val_shards: str,
        batch_size: int,
        eval_batch_size: int,
        num_workers: int = 0,
        seed: int = 0,
        store: str | None = None,
        consistent: bool = True,
        augment: AugmentConfig | None = None,
        fresh_seed: int = 1,
    ) -> None:
        super().__init__()
        if store is None and augment is None:
            raise ValueError("supervised training (no store) needs an augment config")
        self.train_shards = train_shards
        self.val_shards = val_shards
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.store = store
        self.consistent = consistent
        self.augment = augment
        self.fresh_seed = fresh_seed
        self.train_set: ViewDataset | None = None

    def _sampler(self) -> ViewSampler | None:
        if self.store is None:
            return ViewSampler(self.augment, self.fresh_seed)
        if self.consistent:
            return None
        return ViewSampler(TeacherStore(self.store).spec.augment, self.fresh_seed)

    def setup(self, stage: str) -> None:
        rank, world_size = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        self.val_manifest = read_manifest(self.val_shards)
        if not self.val_manifest.labelled:
            raise ValueError(f"validation shards {self.val_shards} hold no labels: mAP needs labelled clips")
        if stage != "fit":
            return
        self.train_set = ViewDataset(
            self.train_shards, store=self.store, sampler=self._sampler(), shuffle=True, seed=self.seed,
            rank=rank, world_size=world_size,
        )
        # ViewDataset gives rank r the shards [r::world_size]; the smallest share sets the batches of every rank.
        shares = [self.train_set.shards[r::world_size] for r in range(world_size)]
        fewest_shards = min(len(share) for share in shares)
        if fewest_shards < max(self.num_workers, 1):
            raise ValueError(
                f"{self.train_shards}: {len(self.train_set.shards)} shards give a rank {fewest_shards}, fewer than "
                f"data.num_workers={self.num_workers} (or none): lower data.num_workers or re-shard with more shards"
            )
        fewest_clips = min(sum(shard.num_samples for shard in share) for share in shares)
        self.num_batches = fewest_clips // self.batch_size
        if self.num_batches == 0:
            raise ValueError(f"{self.train_shards}: a rank gets {fewest_clips} clips, fewer than one batch of "
                             f"data.batch_size={self.batch_size}")

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's shuffle and view; the DataLoader's workers copy it when the epoch's iterator starts."""
        self.train_set.set_epoch(epoch)

    def train_dataloader(self) -> DataLoader:
        # Called once when fitting starts, also when resuming, and that first iterator (whose workers copy the
        # dataset) serves the first epoch to run: the epoch Lightning is about to process, which on resuming from an
        # end-of-epoch checkpoint is one past `current_epoch` (the epoch's completion is only counted after that).
        self.set_epoch(self.trainer.fit_loop.epoch_progress.current.processed if self.trainer else 0)
        collate = collate_supervised if self.store is None else collate_distill
        return DataLoader(
            EqualBatches(self.train_set, self.batch_size, self.num_batches, collate),
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=False,
            pin_memory=torch.cuda.is_available(),
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            ClipStream(self.val_manifest, shuffle_shards=False, shuffle_buffer=0),
            batch_size=self.eval_batch_size,
            collate_fn=partial(collate_clips, num_classes=self.val_manifest.num_classes),
            num_workers=min(self.num_workers, len(self.val_manifest.shards)),
            pin_memory=torch.cuda.is_available(),
        )
