"""Streaming shards for training: shard order shuffle, node/worker split, buffer shuffle, decode, and batching."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import webdataset as wds
from torch.utils.data import IterableDataset

from ced_train.data.manifest import Manifest
from ced_train.data.shards import Clip, decode_sample


class ClipStream(IterableDataset):
    """Clips from a list of shards, as `Clip`s whose `waveform` is a (samples,) float32 torch tensor at 16 kHz.

    Each epoch, the shard list is shuffled with a seed derived from `(seed, epoch)` only, so every rank and worker sees
    the same order; ranks then take every world_size-th shard and DataLoader workers every num_workers-th of those
    (webdataset's `split_by_node` / `split_by_worker`, which read RANK/WORLD_SIZE or torch.distributed). Within a
    worker, samples pass through a shuffle buffer of `shuffle_buffer` clips seeded by `(seed, epoch, rank, worker)`.
    With fewer shards than ranks x workers some consumers get nothing: equal batch counts per rank are the trainer's
    job (e.g. a fixed number of steps per epoch).

    Args:
        source: a Manifest (local shards) or shard paths/URLs (anything webdataset opens, e.g. `pipe:aws s3 cp ... -`).
        shuffle_shards: shuffle the shard order each epoch; off, shards are read in the given order.
        shuffle_buffer: clips held for shuffling within a worker; 0 or 1 keeps the stored order.
        seed: base seed of both shuffles.
    """

    def __init__(
        self,
        source: Manifest | Sequence[str | Path],
        *,
        shuffle_shards: bool = True,
        shuffle_buffer: int = 1000,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if isinstance(source, Manifest):
            self.urls = [str(path) for path in source.shard_paths]
            self.num_samples: int | None = source.num_samples
        else:
            self.urls = [str(url) for url in source]
            self.num_samples = None
        if not self.urls:
            raise ValueError("ClipStream needs at least one shard, got an empty list")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
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

    def shard_order(self, epoch: int) -> list[str]:
        """The shard list for `epoch` before the node/worker split (identical on every rank and worker)."""
        urls = list(self.urls)
        if self.shuffle_shards:
            random.Random(f"shards:{self.seed}:{epoch}").shuffle(urls)
        return urls

    def __iter__(self) -> Iterator[Clip]:
        epoch = self.epoch
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        shards = wds.split_by_worker(wds.split_by_node([{"url": url} for url in self.shard_order(epoch)]))
        samples = wds.tarfile_samples(shards)
        if self.shuffle_buffer > 1:
            rng = random.Random(f"clips:{self.seed}:{epoch}:{rank}:{worker}")
            samples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples)
        for sample in samples:
            clip = decode_sample(sample["__key__"], sample, Path(sample["__url__"]).name)
            clip.waveform = torch.from_numpy(clip.waveform)
            yield clip


@dataclass
class ClipBatch:
    """A batch of variable-length clips.

    waveform: (batch, max_samples) float32 at 16 kHz, zero-padded after each clip's end.
    lengths: (batch,) int64, each clip's real number of samples.
    labels: (batch, num_classes) float32 multi-hot.
    """

    waveform: torch.Tensor
    lengths: torch.Tensor
    labels: torch.Tensor
    keys: list[str]
    shards: list[str]
    meta: list[dict]

    def __len__(self) -> int:
        return len(self.keys)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ClipBatch:
        return replace(self, waveform=self.waveform.to(device, non_blocking=non_blocking),
                       lengths=self.lengths.to(device, non_blocking=non_blocking),
                       labels=self.labels.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> ClipBatch:  # called by DataLoader(pin_memory=True)
        return replace(self, waveform=self.waveform.pin_memory(), lengths=self.lengths.pin_memory(),
                       labels=self.labels.pin_memory())


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
                     [c["meta"] for c in clips])
