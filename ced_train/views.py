"""Shards + per-(clip, view) augmentation parameters → rendered model inputs; the one data path of the teacher pass
and of student training.

Each clip is cut or zero-padded to the fixed chunk (`AugmentConfig.clip_samples`), turned into log-mel dB by the CED
front end on its own (batch of one, so nothing depends on batch-mates or batch size), then each requested view is
rendered by `augment.apply`. Mixup partners come from the clip's block of `mixup_block_clips` consecutive clips of the
same shard, so only one block per worker is ever in memory.

Three ways to use it:

- teacher pass: `ViewDataset(shards, sampler=ViewSampler(cfg, seed), views=range(V), batch_size=B)` renders every
  view of every clip and yields batches that never span shards;
- consistent distillation ("replay"): `ViewDataset(shards, store=path)` renders view `epoch % V` of each clip with the
  parameters read from the store and yields the stored top-k targets with it: the input the teachers saw, bit for bit;
- no consistency / supervised ("fresh"): `ViewDataset(shards, sampler=ViewSampler(cfg, other_seed), store=path | None)`
  draws new parameters for every epoch.

Call `set_epoch(epoch)` before each epoch (the DataLoader must not use persistent workers, so workers see it).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ced_train.augment import (
    TEACH,
    AugmentConfig,
    ViewSampler,
    apply,
    fixed_length,
    mix_labels,
    params_to_columns,
)
from ced_train.data import ShardInfo, iter_shard, read_manifest
from ced_train.models.frontend import LogMelFrontEnd
from ced_train.store import StoreError, TeacherStore

__all__ = ["ViewDataset"]


class ViewDataset(IterableDataset):
    """Rendered views of the clips of a shard directory.

    Args:
        shards_dir: shard directory (with `manifest.json`).
        store: teacher store; gives the top-k targets and, without a `sampler`, the augmentation parameters.
        sampler: draws fresh parameters instead of reading them (teacher pass, ablation, supervised training).
        views: view indices rendered for every clip (teacher pass: `range(V)`). None (student): one view per epoch,
            view `epoch % V` of the store, or view counter `epoch` for fresh parameters without a store.
        shard_names: only these shards (default: all, in manifest order).
        shuffle: shuffle the shard order and the clip order within each mixup block, per epoch.
        seed: seed of that shuffle.
        batch_size: when set, yield batches of up to this many consecutive items of one shard (use the DataLoader
            with `batch_size=None`); otherwise yield single items for the DataLoader to collate.

    Items (dicts): `key` str, `shard` str, `row` int (stored order in the shard), `view` int, `mel_db` (64, frames)
    float32 augmented log-mel dB, `params` dict of int fields (`augment.VIEW_PARAMS_DTYPE`), `labels` (classes,)
    float32 multi-hot labels mixed like the input, and with a store `topk_values` (k,) float32 and `topk_indices`
    (k,) int64. Batches hold the same keys, with `key`/`shard` as lists and tensors stacked.
    """

    def __init__(
        self,
        shards_dir: str | Path,
        *,
        store: str | Path | None = None,
        sampler: ViewSampler | None = None,
        views: Sequence[int] | None = None,
        shard_names: Sequence[str] | None = None,
        shuffle: bool = False,
        seed: int = 0,
        batch_size: int | None = None,
    ) -> None:
        super().__init__()
        if store is None and sampler is None:
            raise ValueError("ViewDataset needs a store (replay) or a sampler (fresh parameters), got neither")
        manifest = read_manifest(shards_dir)
        self.num_classes = manifest.num_classes
        self.store = TeacherStore(store) if store is not None else None
        self.sampler = sampler
        if self.store is not None:
            spec = self.store.spec
            if spec.manifest_fingerprint != manifest.fingerprint:
                raise StoreError(
                    f"store {self.store.path} was made from shards with fingerprint {spec.manifest_fingerprint}, "
                    f"{shards_dir} has {manifest.fingerprint}"
                )
            if sampler is not None and sampler.purpose == TEACH and sampler.seed == spec.seed:
                raise ValueError(
                    f"fresh parameters with the store's own seed ({spec.seed}) would replay the stored views; "
                    "choose another seed for the sampler"
                )
        self.augment: AugmentConfig = sampler.config if sampler is not None else self.store.spec.augment
        if views is not None and self.store is not None and not all(0 <= v < self.store.num_views for v in views):
            raise ValueError(f"views {list(views)} outside the store's [0, {self.store.num_views})")
        self.views = list(views) if views is not None else None
        by_name = {shard.name: shard for shard in manifest.shards}
        unknown = sorted(set(shard_names or ()) - set(by_name))
        if unknown:
            raise ValueError(f"shards {unknown} are not in {shards_dir}")
        self.shards: list[ShardInfo] = (
            manifest.shards if shard_names is None else [by_name[name] for name in shard_names]
        )
        self.shuffle = shuffle
        self.seed = seed
        self.batch_size = batch_size
        self.epoch = 0
        self._front_end = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_views(self) -> list[int]:
        """The view indices rendered for every clip this epoch."""
        if self.views is not None:
            return self.views
        return [self.epoch % self.store.num_views] if self.store is not None else [self.epoch]

    @property
    def num_clips(self) -> int:
        return sum(shard.num_samples for shard in self.shards)

    def __len__(self) -> int:
        """Items (not batches) per epoch."""
        return self.num_clips * len(self.epoch_views())

    def epoch_shards(self, shards: Sequence[ShardInfo]) -> list[ShardInfo]:
        """`shards` in this epoch's reading order: as given, or shuffled by `(seed, epoch)`."""
        shards = list(shards)
        if self.shuffle:
            random.Random(f"{self.seed}/{self.epoch}/shards").shuffle(shards)
        return shards

    def __iter__(self) -> Iterator[dict]:
        """Every item; DataLoader workers take whole shards in turn (the teacher pass: one part file per shard).
        Ranks split the work outside: the teacher pass by `shard_names`, training by `render` ranges."""
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        for shard in self.epoch_shards(self.shards)[worker_id::num_workers]:
            whole = [(start, 0, self.augment.mixup_block_clips)
                     for start in range(0, shard.num_samples, self.augment.mixup_block_clips)]
            items = self._shard_items(shard, whole)
            yield from (items if self.batch_size is None else _batches(items, self.batch_size))

    def render(self, start: int, stop: int) -> Iterator[dict]:
        """The items of clips `[start, stop)` of this epoch's clip order over all shards.

        That order is: shards in `epoch_shards` order, their mixup blocks in stored order, each block's clips in its
        epoch order (shuffled with `shuffle`). Only the blocks that hold those clips are decoded and rendered (the
        tar is streamed up to them), so consumers of disjoint ranges (ranks, DataLoader workers) share at most their
        boundary blocks.
        """
        block = self.augment.mixup_block_clips
        selected: list[tuple[ShardInfo, list[tuple[int, int, int]]]] = []
        offset = 0
        for shard in self.epoch_shards(self.shards):
            if offset + shard.num_samples > start and offset < stop:
                picks = []
                for block_start in range(0, shard.num_samples, block):
                    size = min(block, shard.num_samples - block_start)
                    lo, hi = max(start - offset - block_start, 0), min(stop - offset - block_start, size)
                    if lo < hi:
                        picks.append((block_start, lo, hi))
                selected.append((shard, picks))
            offset += shard.num_samples
        for shard, picks in selected:
            yield from self._shard_items(shard, picks)

    def log_mel(self, waveform: np.ndarray) -> torch.Tensor:
        """One clip's fixed-length chunk → `(64, frames)` float32 dB, computed alone (batch of one)."""
        if self._front_end is None:
            self._front_end = LogMelFrontEnd()
        chunk = torch.from_numpy(fixed_length(waveform, self.augment.clip_samples))
        with torch.inference_mode():
            return self._front_end(chunk[None])[0]

    def _shard_items(self, shard: ShardInfo, picks: Sequence[tuple[int, int, int]]) -> Iterator[dict]:
        """Items of `shard`'s consecutive mixup blocks `picks`: for each `(block_start, lo, hi)`, the clips at places
        `[lo, hi)` of the block's epoch order."""
        block = self.augment.mixup_block_clips
        views = self.epoch_views()
        store_start = self._store_rows(shard)
        if not picks:  # a shard without clips
            return
        clips = iter_shard(shard.path, picks[0][0], min(picks[-1][0] + block, shard.num_samples))
        for block_start, lo, hi in picks:
            block_clips = list(islice(clips, block))
            expected = shard.keys[block_start : block_start + block]
            if [clip.key for clip in block_clips] != list(expected):
                raise ValueError(f"{shard.path}: clips at rows {block_start}.. do not match the manifest's keys")
            mels = torch.stack([self.log_mel(clip.waveform) for clip in block_clips])
            labels = torch.zeros(len(block_clips), self.num_classes)
            for i, clip in enumerate(block_clips):
                labels[i, clip.labels] = 1.0
            rows = list(range(block_start, block_start + len(block_clips)))
            stored = {}
            if self.store is not None:
                for view in views:
                    stored[view] = self.store.read(view, store_start + rows[0], store_start + rows[-1] + 1)
            order = list(range(len(block_clips)))
            if self.shuffle:
                random.Random(f"{self.seed}/{self.epoch}/{shard.name}/{block_start}").shuffle(order)
            for pos in order[lo:hi]:
                for view in views:
                    if self.sampler is not None:
                        counter = view if self.views is not None else self.epoch
                        params = self.sampler.sample([expected[pos]], [counter], [rows[pos]], shard.num_samples)
                    else:
                        params = stored[view][2][pos : pos + 1]
                    partner = int(params["partner_row"][0]) - block_start
                    if params["partner_row"][0] >= 0 and not 0 <= partner < len(block_clips):
                        raise StoreError(
                            f"{shard.name} row {rows[pos]} view {view}: partner row {params['partner_row'][0]} is "
                            f"outside its mixup block [{block_start}, {block_start + len(block_clips)})"
                        )
                    partner = partner if params["partner_row"][0] >= 0 else pos
                    item = {
                        "key": expected[pos],
                        "shard": shard.name,
                        "row": rows[pos],
                        "view": view,
                        "mel_db": apply(mels[pos : pos + 1], params, mels[partner : partner + 1],
                                        self.augment.mask_fill_db)[0],
                        "params": {name: int(value) for name, value in params_to_columns(params).items()},
                        "labels": mix_labels(labels[pos : pos + 1], labels[partner : partner + 1], params)[0],
                    }
                    if self.store is not None:
                        values, indices, _ = stored[view]
                        item["topk_values"] = torch.from_numpy(values[pos].astype(np.float32))
                        item["topk_indices"] = torch.from_numpy(indices[pos].astype(np.int64))
                    yield item

    def _store_rows(self, shard: ShardInfo) -> int:
        """First store row of `shard`, after checking the store holds exactly its keys."""
        if self.store is None:
            return 0
        start, stop = self.store.shard_rows(shard.name)
        if self.store.keys(start, stop) != list(shard.keys):
            raise StoreError(f"store {self.store.path}: rows of shard {shard.name} do not hold its keys in order")
        return start


def _batches(items: Iterator[dict], batch_size: int) -> Iterator[dict]:
    """Group consecutive items (all of one shard) into batches of up to `batch_size`."""
    while chunk := list(islice(items, batch_size)):
        batch = {
            "key": [item["key"] for item in chunk],
            "shard": [item["shard"] for item in chunk],
            "row": torch.tensor([item["row"] for item in chunk]),
            "view": torch.tensor([item["view"] for item in chunk]),
            "mel_db": torch.stack([item["mel_db"] for item in chunk]),
            "params": {name: torch.tensor([item["params"][name] for item in chunk]) for name in chunk[0]["params"]},
            "labels": torch.stack([item["labels"] for item in chunk]),
        }
        for name in ("topk_values", "topk_indices"):
            if name in chunk[0]:
                batch[name] = torch.stack([item[name] for item in chunk])
        yield batch
