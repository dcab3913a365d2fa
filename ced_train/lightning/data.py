"""The LightningDataModule of both training stages: training views (`ced_train.views.ViewDataset`: decoded clips
and view parameters, rendered by the module on its device) and labelled full-length validation clips
(`ced_train.data.ClipStream`).

Training reads one view per clip per epoch: with a teacher store, view `epoch % V` with its stored augmentation
(`views="replay"`), or other parameters against the same stored targets (`"fresh"`, `"reference"`:
`augment.distill_sampler`); without a store, fresh parameters and the clips' labels (supervised). Ranks and
DataLoader workers split the epoch's clips, not whole shards, and every rank runs the same number of batches (DDP
needs it): see `EqualBatches`; validation likewise splits by clip and pads every rank to the same number of batches
(`ClipStream(pad=True)`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from itertools import islice

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ced_train.augment import AugmentConfig, ViewSampler, distill_sampler
from ced_train.data import ClipStream, collate_clips, read_manifest
from ced_train.data.chunks import chunk_rng_key
from ced_train.data.stream import contiguous_part
from ced_train.lightning.batches import DistillBatch, SupervisedBatch
from ced_train.rendering import collate_views
from ced_train.store import TeacherStore
from ced_train.transfer import pins_memory
from ced_train.views import ViewDataset


def collate_supervised(items: list[dict]) -> SupervisedBatch:
    return SupervisedBatch(
        inputs=collate_views(items),
        labels=torch.stack([item["labels"] for item in items]),
        keys=[chunk_rng_key(item["key"], item["chunk"]) for item in items],
    )


def collate_distill(items: list[dict]) -> DistillBatch:
    """Stored targets only: the items' labels are left behind, so distillation never sees them."""
    return DistillBatch(
        inputs=collate_views(items),
        topk_values=torch.stack([item["topk_values"] for item in items]),
        topk_indices=torch.stack([item["topk_indices"] for item in items]),
        views=torch.tensor([item["view"] for item in items]),
        keys=[chunk_rng_key(item["key"], item["chunk"]) for item in items],
    )


# The option that sets each part of the cut of an epoch into batches (`ViewsDataModule.state_dict`).
OPTION = {"world_size": "trainer.devices x trainer.num_nodes", "num_workers": "data.num_workers",
          "batch_size": "data.batch_size"}


class EqualBatches(IterableDataset):
    """`num_batches` batches of `batch_size` items per epoch on every rank, all ranks' clips disjoint.

    The epoch's clip order (`ViewDataset.render`) is cut into `world_size` contiguous parts of `num_batches *
    batch_size` clips, leaving out its last `clips % (world_size * batch_size)` (fewer than `world_size * batch_size`,
    others every epoch as the order changes), and a rank's batches into one contiguous run per DataLoader worker,
    whatever the shard count. Workers take turns, so batch `i` of the loader is batch `i // W` of the run of turn
    `i % W`. `resume_at(epoch, done)` makes that epoch's next iterator yield only the batches after its first `done`
    (which a mid-epoch checkpoint had trained on), in the same order. Use with `DataLoader(batch_size=None)`; `len()`
    is `num_batches`.

    The epoch and the resume point live in shared memory: persistent DataLoader workers, forked once, read them
    when each epoch's iterator starts (`set_epoch` before `iter(loader)`, as Lightning's `on_train_epoch_start`).
    """

    def __init__(self, dataset: ViewDataset, batch_size: int, rank: int, world_size: int,
                 collate: Callable[[list], object]) -> None:
        super().__init__()
        self.dataset = dataset
        self.batch_size = batch_size
        self.rank = rank
        self.num_batches = dataset.num_rows // (world_size * batch_size)
        if self.num_batches == 0:
            raise ValueError(f"{dataset.num_rows} training chunk rows are fewer than one batch of {batch_size} per rank "
                             f"on {world_size} rank(s): lower data.batch_size")
        self.collate = collate
        self._state = torch.zeros(3, dtype=torch.int64).share_memory_()  # epoch, resume epoch, batches done of it

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        self._state[0] = epoch

    def resume_at(self, epoch: int, done: int) -> None:
        self._state[1:] = torch.tensor([epoch, done])

    def __iter__(self) -> Iterator[object]:
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        epoch, resume_epoch, done = self._state.tolist()
        self.dataset.set_epoch(epoch)
        done = done if epoch == resume_epoch else 0
        # The loader asks worker 0 first: after `done` batches, that is the turn of the worker who had batch `done`.
        turn = (worker_id + done) % num_workers
        first, stop = contiguous_part(self.num_batches, turn, num_workers)
        first += len(range(turn, done, num_workers))  # that worker's batches among the first `done`
        rank_start = self.rank * self.num_batches * self.batch_size
        items = self.dataset.render(rank_start + first * self.batch_size, rank_start + stop * self.batch_size)
        for _ in range(first, stop):
            yield self.collate(list(islice(items, self.batch_size)))


class ViewsDataModule(pl.LightningDataModule):
    """Training views and validation clips.

    Args:
        train_shards, val_shards: shard directories (validation shards must be labelled).
        batch_size: training clips per batch on each rank; eval_batch_size: validation clips per batch.
        num_workers: DataLoader workers per rank (any number: they split the rank's clips).
        seed: seed of the shard and clip shuffles.
        store: teacher store (distillation) or None (supervised training on labels).
        views: with a store (`distill.views`): "replay" its views, draw "fresh" ones with `fresh_seed`, or the
            "reference" implementation's inconsistent ones (`augment.distill_sampler`).
        augment: the augmentation of fresh views without a store (supervised training).
        fresh_seed: seed of fresh views, which come from their own streams (purpose "fresh" with a store, "train"
            without), so they never repeat the teacher pass's views whatever the seeds.
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
        views: str = "replay",
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
        self.views = views
        self.augment = augment
        self.fresh_seed = fresh_seed
        self.sampler = self._sampler()  # refuses a bad `views` before training starts
        self.train_set: ViewDataset | None = None
        self._saved_layout: dict | None = None  # the batch layout of the checkpoint being resumed, if any

    def _sampler(self) -> ViewSampler | None:
        if self.store is None:
            return ViewSampler(self.augment, self.fresh_seed, purpose="train")
        return distill_sampler(self.views, TeacherStore(self.store).spec.augment, self.fresh_seed)

    def setup(self, stage: str) -> None:
        self.rank, self.world_size = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        self.val_manifest = read_manifest(self.val_shards)
        if not self.val_manifest.labelled:
            raise ValueError(f"validation shards {self.val_shards} hold no labels: mAP needs labelled clips")
        if stage != "fit":
            return
        self.train_set = ViewDataset(self.train_shards, store=self.store, sampler=self.sampler, shuffle=True,
                                     seed=self.seed)
        collate = collate_supervised if self.store is None else collate_distill
        self.train_batches = EqualBatches(self.train_set, self.batch_size, self.rank, self.world_size, collate)

    @property
    def num_batches(self) -> int:
        """Training batches per epoch on every rank."""
        return self.train_batches.num_batches

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's shuffle and view; the DataLoader's workers read it when the epoch's iterator starts."""
        self.train_batches.set_epoch(epoch)

    def state_dict(self) -> dict:
        """How the epoch's batches are cut (kept in checkpoints): a mid-epoch checkpoint's count of batches done
        means the same batches only under the same cut."""
        return {"batch_layout": self._batch_layout()}

    def load_state_dict(self, state_dict: dict) -> None:
        self._saved_layout = state_dict.get("batch_layout")

    def _batch_layout(self) -> dict:
        return {"world_size": self.world_size, "num_workers": self.num_workers, "batch_size": self.batch_size}

    def _check_resume_layout(self, epoch: int, done: int) -> None:
        """Refuse to continue a mid-epoch checkpoint under another cut of the epoch's batches, which would repeat
        some of its batches and skip others."""
        saved, now = self._saved_layout, self._batch_layout()
        if done == 0 or saved is None or saved == now:
            return
        differ = ", ".join(f"{OPTION[key]}={saved[key]} then, {now[key]} now" for key in now if saved.get(key) != now[key])
        raise ValueError(f"the checkpoint stopped {done} batches into epoch {epoch} with another cut of the epoch's "
                         f"batches ({differ}): resume with the checkpoint's settings, or from a checkpoint written at "
                         "an epoch's end")

    def train_dataloader(self) -> DataLoader:
        # Called once when fitting starts, also when resuming, and that first iterator (whose workers copy the
        # dataset) serves the first epoch to run: the epoch Lightning is about to process, which on resuming from an
        # end-of-epoch checkpoint is one past `current_epoch` (the epoch's completion is only counted after that).
        # A mid-epoch checkpoint's epoch continues after the batches it had trained on.
        epoch, done = 0, 0
        if self.trainer:
            epoch = self.trainer.fit_loop.epoch_progress.current.processed
            done = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        done = done if done < self.num_batches else 0
        self._check_resume_layout(epoch, done)
        self.set_epoch(epoch)
        self.train_batches.resume_at(epoch, done)
        # Workers forked once for the whole fit: each epoch only restarts their iterators (`EqualBatches` reads the
        # epoch from shared memory), with no fork, shard re-opening or first-block decode per epoch.
        return DataLoader(
            self.train_batches,
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self._pin_memory(),
        )

    def _pin_memory(self) -> bool:
        return pins_memory(self.trainer.strategy.root_device) if self.trainer else False

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            ClipStream(self.val_manifest, rank=self.rank, world_size=self.world_size, pad=True),
            batch_size=self.eval_batch_size,
            collate_fn=partial(collate_clips, num_classes=self.val_manifest.num_classes),
            num_workers=self.num_workers,
            pin_memory=self._pin_memory(),
        )
