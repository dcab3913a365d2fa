"""Shards + per-(row, view) augmentation parameters → what the views are rendered from; the one data path of the
teacher pass and of student training.

A row is one chunk of `AugmentConfig.clip_samples` (10 s) of one sample: every chunk of every sample, the last one
kept when at least half a chunk (`ced_train.data.chunks`), in the store's row order. Loader workers only read and
decode here: each chunk is zero-padded to the fixed length as int16 samples, and each requested view is an item
holding that chunk, its mixup partner's chunk and the view's parameters. Batches carry them as
`rendering.ViewInputs`; the front end and `augment.apply` run batched on the training device
(`rendering.ViewRenderer`), so the rendered view is the same whichever batch a view lands in. Mixup partners come from
the row's block of `mixup_block_clips` consecutive rows of the same shard, so only one block per worker (and the
samples its rows come from) is ever in memory. A row's parameters are drawn under its `chunks.chunk_rng_key`.

Three ways to use it:

- teacher pass: `ViewDataset(shards, sampler=ViewSampler(cfg, seed), views=range(V), batch_size=B)` yields every
  view of every row in batches that never span shards;
- consistent distillation ("replay"): `ViewDataset(shards, store=path)` yields view `epoch % V` of each row with the
  parameters read from the store and the stored top-k targets with it: rendered, the input the teachers saw, bit for
  bit on the same device type (a store of the paper's released outputs adds a waveform shift per view, applied here
  to the chunk's own samples before padding, and holds the chunks the release covers: those are the rows);
- no consistency / supervised ("fresh"): `ViewDataset(shards, sampler=ViewSampler(cfg, other_seed), store=path | None)`
  draws new parameters for every epoch; with `ViewSampler(..., reference=True)` and a store, the reference's
  `disable_consistency` views (no shift, fresh masks, the stored mixup).

Call `set_epoch(epoch)` before each epoch; under a DataLoader, `lightning.data.EqualBatches` carries the epoch to its
workers, persistent ones included.
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
    check_params,
    fixed_length,
    mix_labels,
    shift_chunk,
)
from ced_train.data import ShardInfo, iter_shard, read_manifest
from ced_train.data.chunks import ShardChunks, covered_chunks, shard_chunks
from ced_train.rendering import collate_views
from ced_train.store import StoreError, TeacherStore

__all__ = ["ViewDataset", "collate_items"]


class ViewDataset(IterableDataset):
    """Rendered views of the chunk rows of a shard directory.

    Args:
        shards_dir: shard directory (with `manifest.json`).
        store: teacher store; gives the top-k targets and, without a `sampler`, the augmentation parameters.
        sampler: draws fresh parameters instead of reading them (teacher pass, ablations, supervised training); a
            `reference` sampler also gets the stored ones.
        views: view indices rendered for every row (teacher pass: `range(V)`). None (student): one view per epoch,
            view `epoch % V` of the store, or view counter `epoch` for fresh parameters without a store.
        shard_names: only these shards (default: all, in manifest order).
        shuffle: shuffle the shard order and the row order within each mixup block, per epoch.
        seed: seed of that shuffle.
        batch_size: when set, yield batches of up to this many consecutive items of one shard (use the DataLoader
            with `batch_size=None`); otherwise yield single items for the DataLoader to collate.

    Items (dicts): `key` str (the sample's), `chunk` int (of the sample), `shard` str, `row` int (the shard's store
    row), `view` int, `waveform` (samples,) int16 fixed-length chunk, `partner_row` int and `partner_waveform` (its mixup partner's; its own without one),
    `params` dict of int fields (`augment.VIEW_PARAMS_DTYPE`, checked), `fill_db` float, `labels` (classes,) float32
    multi-hot labels mixed like the input, and with a store `topk_values` (k,) float32 and `topk_indices` (k,)
    int64; `rendering.collate_views` makes a batch's `ViewInputs` of them. Batches (`collate_items`) hold
    `key`/`shard` as lists, `chunk`, `row`, `view`, `labels` (and top-k) stacked, `params` as columns, and `inputs`, the
    `ViewInputs`.
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
        self._layouts: dict[str, ShardChunks] = {}

    def layout(self, shard: ShardInfo) -> ShardChunks:
        """The store rows of `shard`: its chunks, or with a store of the paper's released outputs the chunks that
        store covers."""
        if shard.name not in self._layouts:
            layout = shard_chunks(shard, self.augment.clip_samples)
            if self.store is not None and self.store.spec.official:
                start, stop = self.store.shard_rows(shard.name)
                try:
                    layout = covered_chunks(layout, self.store.keys(start, stop), self.store.chunks(start, stop))
                except ValueError as error:
                    raise StoreError(f"store {self.store.path}, shard {shard.name}: {error}") from error
            self._layouts[shard.name] = layout
        return self._layouts[shard.name]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_views(self) -> list[int]:
        """The view indices rendered for every row this epoch."""
        if self.views is not None:
            return self.views
        return [self.epoch % self.store.num_views] if self.store is not None else [self.epoch]

    @property
    def num_rows(self) -> int:
        """Chunk rows of the selected shards."""
        return sum(len(self.layout(shard)) for shard in self.shards)

    def __len__(self) -> int:
        """Items (not batches) per epoch."""
        return self.num_rows * len(self.epoch_views())

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
                     for start in range(0, len(self.layout(shard)), self.augment.mixup_block_clips)]
            items = self._shard_items(shard, whole)
            yield from (items if self.batch_size is None else _batches(items, self.batch_size))

    def render(self, start: int, stop: int) -> Iterator[dict]:
        """The items of rows `[start, stop)` of this epoch's row order over all shards.

        That order is: shards in `epoch_shards` order, their mixup blocks in stored order, each block's rows in its
        epoch order (shuffled with `shuffle`). Only the blocks that hold those rows are decoded and rendered (the
        tar is streamed up to them), so consumers of disjoint ranges (ranks, DataLoader workers) share at most their
        boundary blocks.
        """
        block = self.augment.mixup_block_clips
        selected: list[tuple[ShardInfo, list[tuple[int, int, int]]]] = []
        offset = 0
        for shard in self.epoch_shards(self.shards):
            rows = len(self.layout(shard))
            if offset + rows > start and offset < stop:
                picks = []
                for block_start in range(0, rows, block):
                    size = min(block, rows - block_start)
                    lo, hi = max(start - offset - block_start, 0), min(stop - offset - block_start, size)
                    if lo < hi:
                        picks.append((block_start, lo, hi))
                selected.append((shard, picks))
            offset += rows
        for shard, picks in selected:
            yield from self._shard_items(shard, picks)

    def _shard_items(self, shard: ShardInfo, picks: Sequence[tuple[int, int, int]]) -> Iterator[dict]:
        """Items of `shard`'s consecutive mixup blocks `picks`: for each `(block_start, lo, hi)`, the rows at places
        `[lo, hi)` of the block's epoch order."""
        block, chunk_samples = self.augment.mixup_block_clips, self.augment.clip_samples
        layout = self.layout(shard)
        store_start = self._store_rows(shard, layout)
        if not picks:  # a shard without rows
            return
        block_stop = min(picks[-1][0] + block, len(layout))
        first_sample, stop_sample = int(layout.sample_rows[picks[0][0]]), int(layout.sample_rows[block_stop - 1]) + 1
        clips = iter_shard(shard.path, first_sample, stop_sample, dtype="int16")
        decoded, place = {}, first_sample  # sample place → Clip, for the current block; the next place to read
        for block_start, lo, hi in picks:
            rows = range(block_start, min(block_start + block, len(layout)))
            samples = layout.sample_rows[rows.start : rows.stop].tolist()
            decoded = {i: clip for i, clip in decoded.items() if i >= samples[0]}
            while place <= samples[-1]:
                clip = next(clips, None)
                if clip is None or clip.key != shard.keys[place]:
                    raise ValueError(f"{shard.path}: the sample at place {place} does not match the manifest's key "
                                     f"{shard.keys[place]!r}")
                decoded[place], place = clip, place + 1
            block_clips = [decoded[i] for i in samples]
            expected = [layout.keys[row] for row in rows]
            chunks = layout.chunks[rows.start : rows.stop]
            own = [clip.waveform[int(c) * chunk_samples : (int(c) + 1) * chunk_samples]
                   for clip, c in zip(block_clips, chunks)]
            waveforms = [fixed_length(chunk, chunk_samples) for chunk in own]
            labels = torch.zeros(len(block_clips), self.num_classes)
            for i, clip in enumerate(block_clips):
                labels[i, clip.labels] = 1.0
            views = {view: self._block_views(shard, store_start, block_start, labels, view)
                     for view in self.epoch_views()}
            order = list(range(len(block_clips)))
            if self.shuffle:
                random.Random(f"{self.seed}/{self.epoch}/{shard.name}/{block_start}").shuffle(order)
            for pos in order[lo:hi]:
                for view, (columns, shifts, partners, mixed, values, indices) in views.items():
                    partner, shift = int(partners[pos]), int(shifts[pos])
                    item = {
                        "key": expected[pos],
                        "chunk": int(chunks[pos]),
                        "shard": shard.name,
                        "row": block_start + pos,
                        "view": view,
                        "waveform": fixed_length(shift_chunk(own[pos], shift), chunk_samples) if shift
                        else waveforms[pos],
                        "partner_row": block_start + partner,
                        "partner_waveform": waveforms[partner],
                        "params": {name: int(column[pos]) for name, column in columns.items()},
                        "fill_db": self.augment.mask_fill_db,
                        "labels": mixed[pos],
                    }
                    if values is not None:
                        item["topk_values"], item["topk_indices"] = values[pos], indices[pos]
                    yield item

    def _block_views(self, shard: ShardInfo, store_start: int, block_start: int, labels: torch.Tensor,
                     view: int) -> tuple:
        """One view of the `len(labels)` rows of the mixup block at `block_start`: parameter columns (numpy int64),
        waveform shifts `(n,)` (`augment.shift_chunk`: the stored ones when replaying, else 0), partner places in
        the block (own place without a partner), labels mixed like the inputs, and with a store the top-k values
        `(n, k)` float32 and indices `(n, k)` int64 (else None)."""
        size = len(labels)
        rows = np.arange(block_start, block_start + size)
        values = indices = stored = None
        if self.store is not None:
            values, indices, stored = self.store.read(view, store_start + block_start, store_start + block_start + size)
            values, indices = torch.from_numpy(values.astype(np.float32)), torch.from_numpy(indices.astype(np.int64))
        layout = self.layout(shard)
        if stored is not None:
            check_params(stored, self.augment.frames, len(layout))
        shifts = np.zeros(size, np.int64)
        if self.sampler is None:
            params = stored
            shifts = self.store.shift_samples(view, store_start + block_start, store_start + block_start + size)
        else:
            counter = view if self.views is not None else self.epoch
            params = self.sampler.sample(layout.rng_keys[block_start : block_start + size], [counter] * size,
                                         rows.tolist(), len(layout), stored)
        partner_row = params["partner_row"].astype(np.int64)
        outside = (partner_row >= 0) & ((partner_row < block_start) | (partner_row >= block_start + size))
        if outside.any():
            row = int(np.flatnonzero(outside)[0])
            raise StoreError(f"{shard.name} row {block_start + row} view {view}: partner row {partner_row[row]} is "
                             f"outside its mixup block [{block_start}, {block_start + size})")
        partners = np.where(partner_row >= 0, partner_row - block_start, np.arange(size))
        columns = {name: params[name].astype(np.int64) for name in params.dtype.names}
        return columns, shifts, partners, mix_labels(labels, labels[partners], params), values, indices

    def _store_rows(self, shard: ShardInfo, layout: ShardChunks) -> int:
        """First store row of `shard`, after checking the store holds exactly its chunk rows."""
        if self.store is None:
            return 0
        start, stop = self.store.shard_rows(shard.name)
        if self.store.keys(start, stop) != list(layout.keys) or not np.array_equal(self.store.chunks(start, stop),
                                                                                   layout.chunks):
            raise StoreError(f"store {self.store.path}: rows of shard {shard.name} do not hold its chunks in order "
                             f"(chunks of {self.augment.clip_samples} samples)")
        return start


def collate_items(items: Sequence[dict]) -> dict:
    """Items → one batch dict (see `ViewDataset`); also the `collate_fn` of a DataLoader over single items."""
    inputs = collate_views(items)
    batch = {
        "key": [item["key"] for item in items],
        "shard": [item["shard"] for item in items],
        "chunk": torch.tensor([item["chunk"] for item in items]),
        "row": torch.tensor([item["row"] for item in items]),
        "view": torch.tensor([item["view"] for item in items]),
        "params": inputs.params,
        "labels": torch.stack([item["labels"] for item in items]),
        "inputs": inputs,
    }
    for name in ("topk_values", "topk_indices"):
        if name in items[0]:
            batch[name] = torch.stack([item[name] for item in items])
    return batch


def _batches(items: Iterator[dict], batch_size: int) -> Iterator[dict]:
    """Group consecutive items (all of one shard) into batches of up to `batch_size`."""
    while chunk := list(islice(items, batch_size)):
        yield collate_items(chunk)
