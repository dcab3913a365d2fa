"""The teacher store at AudioSet-2M scale, simulated, measured in one run (no audio, no teachers):

  build   2,000,000 clips x 10 views in shards of 1,000, with vectorised synthetic top-k values, class indices and
          view parameters (in bounds, mixup partners in their block), written by the real writer (`write_part` per
          shard, then `merge_parts`): bytes per (clip, view) and build time
  read    rank 0 of 8 reading its clips' rows the way distillation's data path does (`ViewDataset`: per shard its
          rows and keys, then per mixup block one view's top-k and parameters through `TeacherStore`), for
          `--read-seconds`, in a forked DataLoader worker: clips/s per core, against the FLAC decode ceiling
          (`--decode-ceiling`, clips/s per core, measured by benchmarks/loader.py; target: >= 10 x), and the growth
          of the worker's resident memory after the fork (target <= 300 MB)

Peak disk is about twice the store (parts + store, ~4 GB); everything is removed at the end.

    python benchmarks/store_scale.py [--clips 2000000] [--views 10] [--read-seconds 20] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ced_train.augment import VIEW_PARAMS_DTYPE, AugmentConfig
from ced_train.store import StoreSpec, TeacherStore, merge_parts, write_part

SHARD_CLIPS = 1000
TOP_K = 20
NUM_CLASSES = 527


def synthetic_part(rng: np.random.Generator, views: int, clips: int, augment: AugmentConfig):
    """Random but valid (views, clips) view parameters and top-k outputs, vectorised."""
    params = np.zeros((views, clips), dtype=VIEW_PARAMS_DTYPE)
    frames, block = augment.frames, augment.mixup_block_clips
    params["shift_frames"] = rng.integers(-augment.max_shift_frames, augment.max_shift_frames + 1, (views, clips))
    widths = rng.integers(0, augment.time_mask_max_frames + 1, (views, clips))
    params["time_mask_frames"] = widths
    params["time_mask_start"] = (rng.random((views, clips)) * (frames - widths + 1)).astype(np.int64)
    bins = rng.integers(0, augment.freq_mask_max_bins + 1, (views, clips))
    params["freq_mask_bins"] = bins
    params["freq_mask_start"] = (rng.random((views, clips)) * (64 - bins + 1)).astype(np.int64)
    rows = np.arange(clips)
    block_start = rows - rows % block
    block_size = np.minimum(block, clips - block_start)
    partner = block_start + (rng.random((views, clips)) * block_size).astype(np.int64)
    mixed = (rng.random((views, clips)) < augment.mixup_prob) & (block_size > 1)
    params["partner_row"] = np.where(mixed, partner, -1)
    params["partner_weight_q"] = np.where(mixed, rng.integers(1, 256, (views, clips)), 0)
    values = np.sort(rng.random((views, clips, TOP_K), dtype=np.float32), axis=-1)[..., ::-1]
    indices = np.argsort(rng.random((views, clips, NUM_CLASSES), dtype=np.float32), axis=-1)[..., :TOP_K]
    return params, values, indices.astype(np.int16)


def build(root: Path, clips: int, views: int) -> tuple[Path, StoreSpec, float]:
    augment = AugmentConfig()
    spec = StoreSpec("simulated-as2m", augment, 0, ({"file": "simulated"},), "probability", TOP_K, views,
                     NUM_CLASSES)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    parts = []
    for shard in range(-(-clips // SHARD_CLIPS)):
        n = min(SHARD_CLIPS, clips - shard * SHARD_CLIPS)
        keys = [f"clip{shard * SHARD_CLIPS + i:08d}" for i in range(n)]
        parts.append(write_part(root / "parts" / f"shard-{shard:06d}.h5", spec, f"shard-{shard:06d}", keys,
                                np.zeros(n, np.int32), *synthetic_part(rng, views, n, augment)))
        if shard % 200 == 0:
            print(f"  parts written: {shard + 1} ({time.perf_counter() - start:.0f} s)", flush=True)
    parts_s = time.perf_counter() - start
    store = merge_parts(root / "store.h5", spec, parts)
    total_s = time.perf_counter() - start
    print(f"  parts {parts_s:.0f} s, merge {total_s - parts_s:.0f} s", flush=True)
    shutil.rmtree(root / "parts")
    return store, spec, total_s


def resident_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class RankReads(IterableDataset):
    """In a DataLoader worker: rank 0 of `world_size`'s store reads for `seconds`, in the data path's order; yields
    one summary dict (clips read, seconds, RSS at start and end in MB)."""

    def __init__(self, store: Path, world_size: int, seconds: float, view: int) -> None:
        self.store, self.world_size, self.seconds, self.view = store, world_size, seconds, view

    def __iter__(self):
        assert get_worker_info() is not None, "meant to run in a forked DataLoader worker"
        rss_start = resident_mb()
        store = TeacherStore(self.store)  # opened after the fork, as a worker does
        block = AugmentConfig().mixup_block_clips
        shards = store.shard_names[: len(store.shard_names) // self.world_size]  # rank 0's contiguous part
        clips, start = 0, time.perf_counter()
        for shard in shards:
            first, stop = store.shard_rows(shard)
            keys = store.keys(first, stop)  # ViewDataset checks them against the manifest's
            assert len(keys) == stop - first
            for row in range(first, stop, block):
                values, indices, params = store.read(self.view, row, min(row + block, stop))
                clips += len(params)
            if time.perf_counter() - start > self.seconds:
                break
        yield {"clips": clips, "seconds": time.perf_counter() - start, "rss_start": rss_start,
               "rss_end": resident_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=2_000_000)
    parser.add_argument("--views", type=int, default=10)
    parser.add_argument("--read-seconds", type=float, default=20.0)
    parser.add_argument("--world-size", type=int, default=8)
    parser.add_argument("--decode-ceiling", type=float, default=621.0,
                        help="FLAC shard decode, clips/s per core (benchmarks/loader.py; 621 in the issue)")
    parser.add_argument("--dir", default=None, help="where the store is built (default: the temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ced_store_scale_", dir=args.dir) as tmp:
        root = Path(tmp)
        print(f"building a store of {args.clips:,} clips x {args.views} views in shards of {SHARD_CLIPS}", flush=True)
        store_path, spec, build_s = build(root, args.clips, args.views)
        size = store_path.stat().st_size
        per_view = size / (args.clips * args.views)
        torch.set_num_threads(1)
        loader = DataLoader(RankReads(store_path, args.world_size, args.read_seconds, view=3), batch_size=None,
                            num_workers=1, multiprocessing_context="fork")
        [reads] = list(loader)
    rate = reads["clips"] / reads["seconds"]
    growth = reads["rss_end"] - reads["rss_start"]
    print(f"store {size / 1e9:.2f} GB: {per_view:.1f} bytes per (clip, view) (target <= 100), built in {build_s:.0f} s")
    print(f"read, rank 0 of {args.world_size}, one worker: {rate:,.0f} clips/s per core over {reads['clips']:,} clips "
          f"({reads['seconds']:.1f} s)")
    print(f"ratio read / FLAC decode ceiling ({args.decode_ceiling:.0f} clips/s per core; target >= 10): "
          f"{rate / args.decode_ceiling:.1f}")
    print(f"worker RSS {reads['rss_start']:.0f} MB after fork -> {reads['rss_end']:.0f} MB: growth {growth:.0f} MB "
          "(target <= 300)")


if __name__ == "__main__":
    main()
