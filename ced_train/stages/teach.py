"""Stage `teach`: run the teacher ensemble once over several augmented views of every 10 s chunk of every training
sample and write the teacher store (top-k outputs + the augmentation of each view). See docs/store.md.

Work is split across ranks by shard (torchrun or any launcher that sets RANK/WORLD_SIZE; or a process group the
caller initialised; `teach_ranks`). Each finished shard is written as its own part file (temporary name, then rename)
under `<store>.parts/`; when all parts exist, rank 0 merges them into the store, again atomically. A re-run splits
only the shards without a finished part across its ranks, so a killed pass redoes only those and never duplicates or
drops a (row, view). Rank 0 holds the lock `<store>.lock` from before anything is deleted or written until the pass
ends, also when it stops on SIGTERM, so a second pass on the same store is refused instead of removing the first
one's files.
"""

from __future__ import annotations

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
from ced_train.data.chunks import num_chunks, shard_chunks
from ced_train.stages import autocast_dtype, check_precision
from ced_train.stages.teach_ranks import (
    barrier,
    decided_by_rank_zero,
    init_distributed,
    is_rank_zero,
    raise_if_terminated,
    resolve_device,
    split_by_rows,
    stop_cleanly_on_sigterm,
)
from ced_train.store import (
    INDEX_DTYPE,
    MISSING_INDEX,
    VALUE_DTYPE,
    StoreError,
    StoreLock,
    StoreLockedError,
    StoreSpec,
    TeacherStore,
    merge_parts,
    part_is_complete,
    write_part,
)
from ced_train.rendering import ViewRenderer
from ced_train.teachers import TeacherEnsemble
from ced_train.views import ViewDataset


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
        # A label file of your own may hold fewer classes than top_k: then every class is kept.
        top_k=min(teach.top_k, ensemble.num_classes),
        batch_size=teach.batch_size,
        num_workers=teach.num_workers,
        precision=teach.precision,
        device=teach.device,
        overwrite=teach.overwrite,
        break_lock=teach.break_lock,
        timeout_min=teach.timeout_min,
        progress=teach.progress,
    )


@stop_cleanly_on_sigterm()
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
    precision: str = "auto",
    device: str = "auto",
    overwrite: bool = False,
    break_lock: bool = False,
    timeout_min: float = 30.0,
    progress: bool = True,
) -> dict:
    """Write the teacher store for the shards of `shards_dir` at `store_path`; return a summary.

    Args:
        ensemble: the teachers (in eval mode); its `sources`, `averaging` and `num_classes` go into the store.
        augment, seed: the augmentation config and the seed that key every view's parameters.
        num_views: views per chunk row; top_k: outputs kept per view.
        batch_size: (row, view) inputs per ensemble call; batches never span shards.
        num_workers: DataLoader workers that decode clips (whole shards per worker); views render on `device`.
        precision: autocast dtype: "bf16", "fp16", "fp32" (none), or "auto" (bf16 on a GPU, none on a CPU); the
            store records the dtype it resolves to, and one made in another is not reused.
        device: "auto" (this rank's GPU if any, else CPU) or a torch device string.
        overwrite: replace a store or parts made from something else; without it they are an error. Parts of this
            very pass are always kept (they are what a resumed run reuses).
        break_lock: remove the lock `<store>.lock` of another pass (one that was killed) instead of refusing.
        timeout_min: minutes a rank waits for the others (forming the process group, each barrier) before it fails;
            a process group the caller initialised keeps its own timeout.
    """
    check_precision("teach.precision", precision)
    start_time = time.perf_counter()
    manifest = read_manifest(shards_dir)
    device = resolve_device(device)
    dtype = autocast_dtype("teach.precision", precision, device)
    spec = StoreSpec(manifest.fingerprint, augment, seed, tuple(ensemble.sources), ensemble.averaging, top_k,
                     num_views, ensemble.num_classes, precision=str(dtype or torch.float32).removeprefix("torch."))
    rows = num_chunks(manifest.shards, augment.clip_samples)
    store_path = Path(store_path)
    parts_dir = store_path.with_name(store_path.name + ".parts")
    # Before any process group: Lightning's DDP re-runs the whole app in child processes (LOCAL_RANK and WORLD_SIZE
    # set, RANK not) after this pass is done, and they must find it done without waiting for ranks that never come.
    if _store_is_current(store_path, spec, overwrite):
        if is_rank_zero():
            _remove_leftover_parts(store_path, parts_dir, break_lock)
            print(f"teach: {store_path} is up to date (fingerprint {spec.fingerprint()}); nothing to do")
        return _summary(store_path, spec, rows, 0, 0, time.perf_counter() - start_time)
    rank, world_size = init_distributed(device, timedelta(minutes=timeout_min))
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    locks: list[StoreLock] = []
    try:
        # Rank 0 takes the lock before any rank deletes or writes; a refusal stops every rank now.
        decided_by_rank_zero(rank, world_size,
                             lambda: locks.append(StoreLock.acquire(store_path, break_lock=break_lock)))
        if _store_is_current(store_path, spec, overwrite):  # written by another pass since the check above
            if rank == 0:
                print(f"teach: {store_path} was written by another pass meanwhile; nothing to do")
            return _summary(store_path, spec, rows, 0, 0, time.perf_counter() - start_time)
        if store_path.exists():  # made from something else, to be replaced (else the check raised)
            barrier(world_size)  # every rank has read the old store before rank 0 removes it
            if rank == 0:
                store_path.unlink()
        parts_dir.mkdir(parents=True, exist_ok=True)

        # Only the shards without a finished part are split, by chunk rows, so that a resumed pass's ranks have equal
        # work left; rank 0 lists them once for all, so that every rank splits the same list.
        unfinished = decided_by_rank_zero(rank, world_size,
                                          lambda: _unfinished(parts_dir, spec, manifest.shards, overwrite))
        pending = [manifest.shards[i] for i in unfinished]
        split = split_by_rows([num_chunks([shard], augment.clip_samples) for shard in pending], world_size)
        mine = [pending[i] for i in split[rank]]
        if mine:
            _run_shards(shards_dir, mine, parts_dir, spec, ensemble, batch_size, num_workers, dtype, device,
                        progress and rank == 0)
        barrier(world_size)
        if rank == 0:
            for stale in [*parts_dir.glob("*.tmp-*"), *store_path.parent.glob(f"{store_path.name}.tmp-*")]:
                stale.unlink()  # temporary files of a killed run: every rank has finished writing
            merge_parts(store_path, spec, [parts_dir / f"{shard.name}.h5" for shard in manifest.shards])
            shutil.rmtree(parts_dir)
            print(f"teach: store written to {store_path}")
        barrier(world_size)
    finally:
        for lock in locks:
            lock.release()
    reused = len(manifest.shards) - len(pending) if rank == 0 else 0  # rank 0 checked every part
    return _summary(store_path, spec, rows, num_chunks(mine, augment.clip_samples), reused,
                    time.perf_counter() - start_time)


def _store_is_current(store_path: Path, spec: StoreSpec, overwrite: bool) -> bool:
    """True if the store exists with `spec`'s fingerprint; False if it is absent or is to be replaced (`overwrite`).

    Raises:
        StoreError: the store is unreadable or made from something else, and `overwrite` is off.
    """
    if not store_path.exists():
        return False
    try:
        with TeacherStore(store_path) as existing:
            found = existing.spec
    except StoreError:
        if not overwrite:
            raise
        return False  # unreadable: replaced like a store of other settings
    if found.fingerprint() == spec.fingerprint():
        return True
    if not overwrite:
        raise StoreError(
            f"{store_path} exists and was made from something else ({'; '.join(found.differences(spec))}); "
            "pass teach.overwrite=true to replace it, or choose another store.path"
        )
    return False


def _remove_leftover_parts(store_path: Path, parts_dir: Path, break_lock: bool) -> None:
    """Remove the parts of a pass killed right after its merge, unless another pass holds the lock (they are its)."""
    if not parts_dir.exists():
        return
    try:
        with StoreLock.acquire(store_path, break_lock=break_lock):
            shutil.rmtree(parts_dir, ignore_errors=True)
    except StoreLockedError as error:
        print(f"teach: leaving {parts_dir} alone: {error}")


def _unfinished(parts_dir: Path, spec: StoreSpec, shards: list[ShardInfo], overwrite: bool) -> list[int]:
    """Indices of the `shards` without a finished part of this pass in `parts_dir`."""
    return [i for i, shard in enumerate(shards)
            if not _part_done(parts_dir / f"{shard.name}.h5", spec, shard, overwrite)]


def _part_done(path: Path, spec: StoreSpec, shard: ShardInfo, overwrite: bool) -> bool:
    """True for a finished part of this pass; a part of another pass is an error, or removed with `overwrite`."""
    try:
        return part_is_complete(path, spec, shard.name, len(shard_chunks(shard, spec.augment.clip_samples)))
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
    dtype: torch.dtype | None,
    device: torch.device,
    progress: bool,
) -> None:
    """Render, run (autocast to `dtype`, None for none) and write `shards` (all views), one part file per finished
    shard."""
    dataset = ViewDataset(shards_dir, sampler=ViewSampler(spec.augment, spec.seed), views=range(spec.num_views),
                          shard_names=[shard.name for shard in shards], batch_size=batch_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers,
                                         pin_memory=device.type == "cuda")
    ensemble = ensemble.to(device).eval()
    renderer = ViewRenderer().to(device)
    layouts = {shard.name: dataset.layout(shard) for shard in shards}
    buffers: dict[str, dict] = {}
    views = spec.num_views
    unfinished = set(layouts)
    for name, layout in layouts.items():
        if len(layout) == 0:  # no sample of the shard holds a chunk: the loader yields nothing for it
            write_part(parts_dir / f"{name}.h5", spec, name, [], layout.chunks, *_empty_arrays(spec, 0))
            unfinished.discard(name)
    with tqdm(total=len(dataset), unit="view", desc="teach", disable=not progress, dynamic_ncols=True) as bar:
        for batch in loader:
            raise_if_terminated()
            mel_db = renderer(batch["inputs"].to(device, non_blocking=True))
            with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                probs = ensemble(mel_db)
            values, indices = probs.float().topk(spec.top_k, dim=1)
            name = batch["shard"][0]
            num = len(layouts[name])
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
                write_part(parts_dir / f"{name}.h5", spec, name, list(layouts[name].keys), layouts[name].chunks,
                           buffer["params"], buffer["values"], buffer["indices"])
                del buffers[name]
                unfinished.discard(name)
    if unfinished:
        raise RuntimeError(f"teach: shards {sorted(unfinished)} ended incomplete; their parts were not written")


def _empty_arrays(spec: StoreSpec, num_rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One shard's part arrays before any batch: params `(views, n)`, values `(views, n, k)` float16 and indices
    `(views, n, k)` int16 filled with the store's "never written" marker."""
    shape = (spec.num_views, num_rows)
    return (np.zeros(shape, VIEW_PARAMS_DTYPE), np.zeros(shape + (spec.top_k,), VALUE_DTYPE),
            np.full(shape + (spec.top_k,), MISSING_INDEX, INDEX_DTYPE))


def _summary(store_path: Path, spec: StoreSpec, rows: int, rows_run: int, parts_reused: int, elapsed_s: float):
    """The pass's summary; `parts_reused` counts on rank 0 (which checks every part) and is 0 on the other ranks."""
    size = store_path.stat().st_size if store_path.exists() else 0
    return {
        "store": str(store_path),
        "fingerprint": spec.fingerprint(),
        "rows": rows,
        "views": spec.num_views,
        "top_k": spec.top_k,
        "rows_run_by_this_rank": rows_run,
        "parts_reused_by_this_rank": parts_reused,
        "elapsed_s": elapsed_s,
        "views_per_s": rows_run * spec.num_views / elapsed_s if elapsed_s > 0 else 0.0,
        "file_bytes_per_row_view": size / max(1, rows * spec.num_views),
    }
