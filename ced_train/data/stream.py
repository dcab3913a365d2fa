"""Streaming labelled clips for scoring (validation, evaluate): every clip exactly once across ranks and DataLoader
workers, equal batch counts per rank, padding, and batching."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import torch
from torch.utils.data import IterableDataset, get_worker_info

from ced_train.data.manifest import Manifest
from ced_train.data.shards import Clip, iter_shard
from ced_train.transfer import copies_async

PADDING_SAMPLES = 1600  # 0.1 s of silence: the waveform of a padding clip


def contiguous_part(total: int, index: int, parts: int) -> tuple[int, int]:
    """`[start, stop)` of part `index` when `total` items are cut into `parts` contiguous parts whose sizes differ by
    at most one (the larger ones first)."""
    if not 0 <= index < parts:
        raise ValueError(f"part {index} outside 0..{parts - 1}")
    size, extra = divmod(total, parts)
    start = index * size + min(index, extra)
    return start, start + size + (index < extra)


def padding_clip() -> Clip:
    """A stand-in clip that keeps batch counts equal across ranks; `ClipBatch.padding` marks it for dropping."""
    return Clip("", torch.zeros(PADDING_SAMPLES), [], {"padding": True}, "")


class ClipStream(IterableDataset):
    """The clips of a shard directory as `Clip`s whose `waveform` is a (samples,) float32 torch tensor at 16 kHz.

    Each epoch the clip sequence (shards in manifest order, or shuffled with a seed of `(seed, epoch)` only, so every
    rank and worker agrees on it) is cut into `world_size` contiguous parts whose sizes differ by at most one, and a
    rank's part into one contiguous part per DataLoader worker: every clip is read once, by one consumer, for any
    number of ranks and workers, whatever the shard count. With `pad`, every rank yields `ceil(clips / world_size)`
    items, the missing ones as `padding_clip()`s at its end, so that every rank (and each of its workers) runs the same
    number of batches (DDP: a rank without a batch would skip collectives); drop them with `ClipBatch.padding`.
    Within a worker, clips pass through a shuffle buffer of `shuffle_buffer` clips seeded by `(seed, epoch, rank,
    worker)`.

    Args:
        manifest: the shards (their clip counts place the parts).
        rank, world_size: this process's part; (0, 1) reads everything.
        pad: pad every rank to the same number of items (see above).
        shuffle_shards: shuffle the shard order each epoch; off, shards are read in manifest order.
        shuffle_buffer: clips held for shuffling within a worker; 0 or 1 keeps the stored order.
        seed: base seed of both shuffles.
    """

    def __init__(
        self,
        manifest: Manifest,
        *,
        rank: int = 0,
        world_size: int = 1,
        pad: bool = False,
        shuffle_shards: bool = False,
        shuffle_buffer: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not manifest.shards:
            raise ValueError(f"{manifest.root} holds no shards")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
        self.shards = list(manifest.shards)
        self.num_samples = manifest.num_samples
        self.rank, self.world_size, self.pad = rank, world_size, pad
        self.shuffle_shards = shuffle_shards
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        # Shared memory so that set_epoch reaches DataLoader workers that persist across epochs.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    @property
    def rank_items(self) -> int:
        """Items this rank yields per epoch, padding included. (No `__len__`: with several DataLoader workers, batch
        counts do not follow from it, and Lightning would cut validation short.)"""
        start, stop = contiguous_part(self.num_samples, self.rank, self.world_size)
        return -(-self.num_samples // self.world_size) if self.pad else stop - start

    def shard_order(self, epoch: int) -> list:
        """The epoch's shards (`ShardInfo`s), identical on every rank and worker."""
        shards = list(self.shards)
        if self.shuffle_shards:
            random.Random(f"shards:{self.seed}:{epoch}").shuffle(shards)
        return shards

    def _clips(self, shards: Sequence, start: int, stop: int) -> Iterator[Clip]:
        """Clips at positions `[start, stop)` of the sequence of `shards`' clips."""
        offset = 0
        for shard in shards:
            first, last = max(start - offset, 0), min(stop - offset, shard.num_samples)
            if first < last:
                yield from iter_shard(shard.path, first, last)
            offset += shard.num_samples

    def __iter__(self) -> Iterator[Clip]:
        epoch = self.epoch
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        rank_start, rank_stop = contiguous_part(self.num_samples, self.rank, self.world_size)
        # Workers split the rank's items, padding included, so that every rank's workers hold equal shares.
        start, stop = contiguous_part(self.rank_items, worker_id, num_workers)
        real_stop = min(stop, rank_stop - rank_start)
        clips = self._clips(self.shard_order(epoch), rank_start + start, rank_start + real_stop)
        if self.shuffle_buffer > 1:
            rng = random.Random(f"clips:{self.seed}:{epoch}:{self.rank}:{worker_id}")
            clips = _shuffled(clips, self.shuffle_buffer, rng)
        for clip in clips:
            clip.waveform = torch.from_numpy(clip.waveform)
            yield clip
        for _ in range(stop - max(start, real_stop)):
            yield padding_clip()


def _shuffled(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """Items through a buffer of `size`: each output is drawn uniformly from the buffer, which refills from `items`."""
    buffer = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= size:
            yield buffer.pop(rng.randrange(len(buffer)))
    rng.shuffle(buffer)
    yield from buffer


@dataclass
class ClipBatch:
    """A batch of variable-length clips.

    waveform: (batch, max_samples) float32 at 16 kHz, zero-padded after each clip's end.
    lengths: (batch,) int64, each clip's real number of samples.
    labels: (batch, num_classes) float32 multi-hot.
    padding: (batch,) bool, True for padding clips (`padding_clip`), which scoring drops.
    """

    waveform: torch.Tensor
    lengths: torch.Tensor
    labels: torch.Tensor
    keys: list[str]
    shards: list[str]
    meta: list[dict]
    padding: torch.Tensor

    def __len__(self) -> int:
        return len(self.keys)

    def to(self, device: torch.device | str, non_blocking: bool | None = None) -> ClipBatch:
        """The batch on `device`; `non_blocking=None` (what Lightning passes: nothing) is `transfer.copies_async`."""
        non_blocking = copies_async(device, non_blocking)
        return replace(self, waveform=self.waveform.to(device, non_blocking=non_blocking),
                       lengths=self.lengths.to(device, non_blocking=non_blocking),
                       labels=self.labels.to(device, non_blocking=non_blocking),
                       padding=self.padding.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> ClipBatch:  # called by DataLoader(pin_memory=True)
        return replace(self, waveform=self.waveform.pin_memory(), lengths=self.lengths.pin_memory(),
                       labels=self.labels.pin_memory(), padding=self.padding.pin_memory())


def collate_clips(clips: Sequence[Clip], num_classes: int) -> ClipBatch:
    """Pad clips (numpy or torch waveforms) to the longest and build multi-hot labels over `num_classes`.

    Use as `DataLoader(..., collate_fn=functools.partial(collate_clips, num_classes=527))`.
    """
    if not clips:
        raise ValueError("collate_clips got an empty list of clips")
    waveforms = [torch.as_tensor(clip["waveform"], dtype=torch.float32) for clip in clips]
    lengths = torch.tensor([len(w) for w in waveforms], dtype=torch.int64)
    batch = torch.zeros(len(clips), int(lengths.max()), dtype=torch.float32)
    labels = torch.zeros(len(clips), num_classes, dtype=torch.float32)
    for row, (clip, waveform) in enumerate(zip(clips, waveforms)):
        if waveform.ndim != 1:
            raise ValueError(
                f"clip {clip['key']!r}: expected a (samples,) waveform, found shape {tuple(waveform.shape)}")
        batch[row, : len(waveform)] = waveform
        for index in clip["labels"]:
            if not 0 <= index < num_classes:
                raise ValueError(f"clip {clip['key']!r}: label index {index} outside 0..{num_classes - 1}")
            labels[row, index] = 1.0
    return ClipBatch(batch, lengths, labels, [c["key"] for c in clips], [c["shard"] for c in clips],
                     [c["meta"] for c in clips], torch.tensor([bool(c["meta"].get("padding")) for c in clips]))
