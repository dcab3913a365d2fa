"""Which fixed-length chunks of each sample the teacher pass, distillation and evaluation use.

A sample of `n` samples at 16 kHz gives one chunk per full `chunk_samples` (10 s by default), plus its last partial
chunk when that holds at least half a chunk (the reference drops shorter ones; the model zero-pads the rest). The
first chunk of a file (a sample at source offset 0) is always kept, however short: AudioSet clips of a few seconds
stay in. A piece that data_prep cut out of a long file (offset > 0) follows the half-chunk rule for all its chunks, so
with a piece length that is a multiple of the chunk length, a file gives the same chunks whether or not it was cut.

The store holds one row per (sample, chunk), in the shard's stored sample order then chunk order; `ShardChunks` is
that layout for one shard.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ced_train.data.manifest import ShardInfo


def chunk_count(num_samples: int, chunk_samples: int, offset_samples: int = 0) -> int:
    """Chunks of a sample of `num_samples` samples that starts `offset_samples` into its source file."""
    full, rest = divmod(num_samples, chunk_samples)
    count = full + (2 * rest >= chunk_samples)
    return max(count, 1) if offset_samples == 0 and num_samples > 0 else count


def chunk_rng_key(key: str, chunk: int) -> str:
    """The name a chunk's view parameters are drawn under: the sample key for its first chunk (so a dataset of
    clips up to one chunk long draws what it drew before chunks existed), `key#chunk` for the others (`#` never
    occurs in a sample key)."""
    return key if chunk == 0 else f"{key}#{chunk}"


@dataclass(frozen=True)
class ShardChunks:
    """The store rows of one shard. `keys`: (rows,) sample key per row; `sample_rows`: (rows,) int64 place of the
    row's sample in the shard's stored order; `chunks`: (rows,) int64 chunk index within the sample (its first
    sample is `chunks * chunk_samples`)."""

    keys: tuple[str, ...]
    sample_rows: np.ndarray
    chunks: np.ndarray

    def __len__(self) -> int:
        return len(self.keys)

    @cached_property
    def rng_keys(self) -> list[str]:
        """Each row's `chunk_rng_key`."""
        return [chunk_rng_key(key, int(chunk)) for key, chunk in zip(self.keys, self.chunks)]


def shard_chunks(shard: ShardInfo, chunk_samples: int) -> ShardChunks:
    """The chunk layout of `shard` for chunks of `chunk_samples` samples."""
    counts = [chunk_count(n, chunk_samples, offset) for n, offset in zip(shard.lengths, shard.offsets)]
    sample_rows = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    chunks = np.concatenate([np.arange(c, dtype=np.int64) for c in counts]) if counts else np.zeros(0, np.int64)
    return ShardChunks(tuple(shard.keys[i] for i in sample_rows), sample_rows, chunks)


def num_chunks(shards: list[ShardInfo], chunk_samples: int) -> int:
    """Store rows of `shards` together."""
    return sum(chunk_count(n, chunk_samples, offset)
               for shard in shards for n, offset in zip(shard.lengths, shard.offsets))


def covered_chunks(layout: ShardChunks, keys: list[str], chunks: np.ndarray) -> ShardChunks:
    """The rows `(keys[i], chunks[i])` of `layout`, which must be among its rows and in its order (a store of the
    paper's released outputs holds the chunks the release covers); a `ValueError` names the first that is not."""
    place = {(key, int(chunk)): i for i, (key, chunk) in enumerate(zip(layout.keys, layout.chunks))}
    rows, last = [], -1
    for key, chunk in zip(keys, np.asarray(chunks).tolist()):
        row = place.get((key, chunk))
        if row is None or row <= last:
            raise ValueError(f"row ({key!r}, chunk {chunk}) is " + ("not a chunk of the shard" if row is None
                                                                   else "out of the shard's order"))
        rows.append(row)
        last = row
    rows = np.asarray(rows, dtype=np.int64)
    return ShardChunks(tuple(keys), layout.sample_rows[rows], layout.chunks[rows])
