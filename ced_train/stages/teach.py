"""Stage `teach`: run the teacher ensemble once over several augmented views of every training clip and write the
teacher store (top-k outputs + the augmentation of each view). See docs/store.md.

Work is split across ranks by shard (torchrun or any launcher that sets RANK/WORLD_SIZE; or a process group the
caller initialised). Each finished shard is written as its own part file (temporary name, then rename) under
`<store>.parts/`; when all parts exist, rank 0 merges them into the store, again atomically. A re-run skips finished
parts, so a killed pass redoes only unfinished shards and never duplicates or drops a (clip, view).
"""

from __future__ import annotations

import os
import shutil
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from ced_train.augment import VIEW_PARAMS_DTYPE, AugmentConfig, ViewSampler, params_from_columns
from ced_train.data import ShardInfo, read_manifest
from ced_train.store import (
    INDEX_DTYPE,
    MISSING_INDEX,
    VALUE_DTYPE,
    StoreError,
    StoreSpec,
    TeacherStore,
    merge_parts,
    part_is_complete,
    write_part,
)
from ced_train.teachers import TeacherEnsemble
from ced_train.views import ViewDataset

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def run(cfg: DictConfig) -> dict:
    from hydra.utils import instantiate

    augment: AugmentConfig = instantiate(cfg.augment)
    ensemble: TeacherEnsemble = instantiate(cfg.teachers)
    teach = cfg.teach
    return teacher_pass(
        shards_dir=cfg.data.train_shards,
        store_path=cfg.store.path,
        ensemble=ensemble,
        augment=augment,
        seed=teach.seed,
        num_views=teach.views,
        top_k=teach.top_k,
        batch_size=teach.batch_size,
        num_workers=teach.num_workers,
        precision=teach.precision,
        device=teach.device,
        overwrite=teach.overwrite,
        progress=teach.progress,
    )


def _init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size): from an initialised process group, else from torchrun's environment (initialising one)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    slurm_tasks = int(os.environ.get("SLURM_NTASKS", "1"))
    if "WORLD_SIZE" not in os.environ and slurm_tasks > 1 and "SLURM_PROCID" in os.environ:
        # Without a process group every task would take every shard and race on the parts and the merge.
        raise RuntimeError(
            f"teacher pass: {slurm_tasks} SLURM tasks but no WORLD_SIZE/RANK: start one torchrun per node "
            "(torchrun sets them) or run the pass with a single task (trainer=gpu)"
        )
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    # Ranks finish their shards at different times; the barrier before the merge may wait long.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(days=2))
    return dist.get_rank(), dist.get_world_size()


def _barrier(world_size: int) -> None:
    if world_size > 1:
        torch.distributed.barrier()


def _resolve_device(device: str) -> torch.device:
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def teacher_pass(
    shards_dir: str | Path,
    store_path: str | Path,
    ensemble: TeacherEnsemble,
    augment: AugmentConfig,
    *,
    seed: int,
    num_views: int,
    top_k: int = 20,
    batch_size: int = 64,
    num_workers: int = 0,
    precision: str = "bf16",
    device: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Write the teacher store for the shards of `shards_dir` at `store_path`; return a summary.

    Args:
        ensemble: the teachers (in eval mode); its `sources`, `averaging` and `num_classes` go into the store.
        augment, seed: the augmentation config and the seed that key every view's parameters.
        num_views: views per clip; top_k: outputs kept per view.
        batch_size: (clip, view) inputs per ensemble call; batches never span shards.
        num_workers: DataLoader workers that decode and render clips (whole shards per worker).
        precision: autocast dtype on GPU ("bf16", "fp16", "fp32"); the CPU always runs float32.
        device: "auto" (this rank's GPU if any, else CPU) or a torch device string.
        overwrite: replace a store or parts made from something else; without it they are an error. Parts of this
            very pass are always kept (they are what a resumed run reuses).
    """
    if precision not in AUTOCAST_DTYPES:
        raise ValueError(f"teach.precision={precision!r}: expected one of {', '.join(AUTOCAST_DTYPES)}")
    start_time = time.perf_counter()
    device = _resolve_device(device)
    rank, world_size = _init_distributed(device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    manifest = read_manifest(shards_dir)
    spec = StoreSpec(manifest.fingerprint, augment, seed, tuple(ensemble.sources), ensemble.averaging, top_k,
                     num_views, ensemble.num_classes)
    store_path = Path(store_path)
    parts_dir = store_path.with_name(store_path.name + ".parts")
    if store_path.exists():
        try:
            with TeacherStore(store_path) as existing:
                found = existing.spec
        except StoreError:
            if not overwrite:
                raise
            found = None  # unreadable: replaced like a store of other settings
        if found is not None and found.fingerprint() == spec.fingerprint():
            if rank == 0:
                shutil.rmtree(parts_dir, ignore_errors=True)  # left by a run killed right after its merge
                print(f"teach: {store_path} is up to date (fingerprint {spec.fingerprint()}); nothing to do")
            return _summary(store_path, spec, manifest.num_samples, 0, 0, time.perf_counter() - start_time)
        if not overwrite:
            raise StoreError(
                f"{store_path} exists and was made from something else ({'; '.join(found.differences(spec))}); "
                "pass teach.overwrite=true to replace it, or choose another store.path"
            )
        _barrier(world_size)  # every rank has read the old store before rank 0 removes it
        if rank == 0:
            store_path.unlink()
    parts_dir.mkdir(parents=True, exist_ok=True)

    mine = manifest.shards[rank::world_size]
    pending = [shard for shard in mine if not _part_done(parts_dir / f"{shard.name}.h5", spec, shard, overwrite)]
    if pending:
        _run_shards(shards_dir, pending, parts_dir, spec, ensemble, batch_size, num_workers, precision, device,
                    progress and rank == 0)
    _barrier(world_size)
    if rank == 0:
        for stale in [*parts_dir.glob("*.tmp-*"), *store_path.parent.glob(f"{store_path.name}.tmp-*")]:
            stale.unlink()  # temporary files of a killed run: every rank has finished writing
        merge_parts(store_path, spec, [parts_dir / f"{shard.name}.h5" for shard in manifest.shards])
        shutil.rmtree(parts_dir)
        print(f"teach: store written to {store_path}")
    _barrier(world_size)
    done = sum(shard.num_samples for shard in pending)
    return _summary(store_path, spec, manifest.num_samples, done, len(mine) - len(pending),
                    time.perf_counter() - start_time)


def _part_done(path: Path, spec: StoreSpec, shard: ShardInfo, overwrite: bool) -> bool:
    """True for a finished part of this pass; a part of another pass is an error, or removed with `overwrite`."""
    try:
        return part_is_complete(path, spec, shard.name, shard.num_samples)
    except StoreError:
        if not overwrite:
            raise
        path.unlink()
        return False


def _run_shards(
    shards_dir: str | Path,
    shards: list[ShardInfo],
    parts_dir: Path,
    spec: StoreSpec,
    ensemble: TeacherEnsemble,
    batch_size: int,
    num_workers: int,
    precision: str,
    device: torch.device,
    progress: bool,
) -> None:
    """Render, run and write `shards` (all views), one part file per finished shard."""
    dataset = ViewDataset(shards_dir, sampler=ViewSampler(spec.augment, spec.seed), views=range(spec.num_views),
                          shard_names=[shard.name for shard in shards], rank=0, world_size=1, batch_size=batch_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers,
                                         pin_memory=device.type == "cuda")
    autocast_dtype = AUTOCAST_DTYPES[precision] if device.type == "cuda" else None
    ensemble = ensemble.to(device).eval()
    shard_by_name = {shard.name: shard for shard in shards}
    buffers: dict[str, dict] = {}
    views = spec.num_views
    unfinished = set(shard_by_name)
    for shard in shards:
        if shard.num_samples == 0:  # every file of the shard failed to decode: the loader yields nothing for it
            write_part(parts_dir / f"{shard.name}.h5", spec, shard.name, [], *_empty_arrays(spec, 0))
            unfinished.discard(shard.name)
    with tqdm(total=len(dataset), unit="view", desc="teach", disable=not progress, dynamic_ncols=True) as bar:
        for batch in loader:
            mel_db = batch["mel_db"].to(device, non_blocking=True)
            with torch.inference_mode(), torch.autocast(device.type, dtype=autocast_dtype,
                                                        enabled=autocast_dtype is not None):
                probs = ensemble(mel_db)
            values, indices = probs.float().topk(spec.top_k, dim=1)
            name = batch["shard"][0]
            num = shard_by_name[name].num_samples
            if name not in buffers:
                buffers[name] = dict(zip(("params", "values", "indices"), _empty_arrays(spec, num)), count=0)
            buffer = buffers[name]
            view, row = batch["view"].numpy(), batch["row"].numpy()
            buffer["values"][view, row] = values.cpu().numpy()
            buffer["indices"][view, row] = indices.cpu().numpy()
            buffer["params"][view, row] = params_from_columns(batch["params"])
            buffer["count"] += len(row)
            bar.update(len(row))
            if buffer["count"] == views * num:
                write_part(parts_dir / f"{name}.h5", spec, name, list(shard_by_name[name].keys), buffer["params"],
                           buffer["values"], buffer["indices"])
                del buffers[name]
                unfinished.discard(name)
    if unfinished:
        raise RuntimeError(f"teach: shards {sorted(unfinished)} ended incomplete; their parts were not written")


def _empty_arrays(spec: StoreSpec, num_clips: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One shard's part arrays before any batch: params `(views, n)`, values `(views, n, k)` float16 and indices
    `(views, n, k)` int16 filled with the store's "never written" marker."""
    shape = (spec.num_views, num_clips)
    return (np.zeros(shape, VIEW_PARAMS_DTYPE), np.zeros(shape + (spec.top_k,), VALUE_DTYPE),
            np.full(shape + (spec.top_k,), MISSING_INDEX, INDEX_DTYPE))


def _summary(store_path: Path, spec: StoreSpec, clips: int, clips_run: int, parts_reused: int, elapsed_s: float):
    size = store_path.stat().st_size if store_path.exists() else 0
    return {
        "store": str(store_path),
        "fingerprint": spec.fingerprint(),
        "clips": clips,
        "views": spec.num_views,
        "top_k": spec.top_k,
        "clips_run_by_this_rank": clips_run,
        "parts_reused_by_this_rank": parts_reused,
        "elapsed_s": elapsed_s,
        "views_per_s": clips_run * spec.num_views / elapsed_s if elapsed_s > 0 else 0.0,
        "file_bytes_per_clip_view": size / max(1, clips * spec.num_views),
    }
