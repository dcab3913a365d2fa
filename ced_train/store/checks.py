"""Checks of a teacher store: `info` (counts, sizes, coverage, provenance) and `verify` (against its shards).

    python -m ced_train.store info PATH
    python -m ced_train.store verify PATH --shards DIR [--augment configs/augment/ced.yaml]
    python -m ced_train.store import-official LOGITS_DIR --shards DIR --out STORE [--time-axis batch|chunk]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import h5py
import numpy as np

from ced_train.augment import VIEW_PARAMS_DTYPE, AugmentConfig, check_params, sample_view
from ced_train.data.chunks import ShardChunks, chunk_rng_key, covered_chunks, shard_chunks
from ced_train.models.frontend import num_frames
from ced_train.store.format import (
    CHUNK_CLIPS,
    FORMAT_VERSION,
    INDEX_DTYPE,
    MISSING_INDEX,
    OFFICIAL_BATCH,
    VALUE_DTYPE,
    StoreError,
    StoreSpec,
    TeacherStore,
)
from ced_train.store.official import TIME_AXES, import_official, official_view


def info(path: str | Path) -> dict:
    """Summary of a store: counts, sizes, coverage, provenance."""
    with TeacherStore(path) as store:
        indices = store.file["topk_indices"]
        written = sum(
            int(np.count_nonzero(indices[view, start : start + CHUNK_CLIPS, 0] != MISSING_INDEX))
            for view in range(store.num_views)
            for start in range(0, store.num_rows, CHUNK_CLIPS)
        )
        spec = store.spec
        clip_views = max(1, store.num_rows * spec.num_views)
        return {
            "path": str(store.path),
            "format_version": FORMAT_VERSION,
            "fingerprint": spec.fingerprint(),
            "manifest_fingerprint": spec.manifest_fingerprint,
            "rows": store.num_rows,
            "shards": len(store.shard_names),
            "views": spec.num_views,
            "top_k": spec.top_k,
            "num_classes": spec.num_classes,
            "coverage": written / clip_views,
            "file_bytes": store.path.stat().st_size,
            "file_bytes_per_row_view": store.path.stat().st_size / clip_views,
            "payload_bytes_per_row_view": spec.top_k * (VALUE_DTYPE.itemsize + INDEX_DTYPE.itemsize)
            + VIEW_PARAMS_DTYPE.itemsize + (8 if spec.official else 0),  # imported: int32 shift and seed
            "bytes_per_view": store.path.stat().st_size / spec.num_views,
            "teachers": list(spec.teachers),
            "averaging": spec.averaging,
            "teacher_precision": spec.precision or "not recorded",
            "seed": spec.seed,
            "augment": json.loads(spec.augment.to_json()),
            "view_source": spec.view_source,
            **({"left_out": json.loads(str(store.file.attrs["left_out"]))} if spec.official else {}),
        }


def _examples(items, limit: int = 5) -> str:
    items = list(items)
    shown = ", ".join(str(item) for item in items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def _check_rows(spec: StoreSpec, file: h5py.File, view: int, start: int, stop: int) -> dict[str, int]:
    """Counts of bad (row, view) entries among store rows `[start, stop)` of one view."""
    values = file["topk_values"][view, start:stop].astype(np.float32)
    indices = file["topk_indices"][view, start:stop].astype(np.int64)
    written = indices[:, 0] != MISSING_INDEX
    values, indices = values[written], indices[written]
    ordered = np.sort(indices, axis=1)
    return {
        "missing": int(np.count_nonzero(~written)),
        "partially written": int(np.count_nonzero(np.any(indices == MISSING_INDEX, axis=1))),
        "non-finite values": int(np.count_nonzero(~np.all(np.isfinite(values), axis=1))),
        "values outside [0, 1]": int(np.count_nonzero(np.any((values < 0) | (values > 1), axis=1))),
        f"indices outside [0, {spec.num_classes})": int(
            np.count_nonzero(np.any((indices < MISSING_INDEX) | (indices >= spec.num_classes), axis=1))
        ),
        "repeated class indices": int(np.count_nonzero(np.any(ordered[:, 1:] == ordered[:, :-1], axis=1))),
        "values not descending": int(np.count_nonzero(np.any(np.diff(values, axis=1) > 0, axis=1))),
    }


def _check_params(spec: StoreSpec, params: np.ndarray, shard_start: int, shard_clips: int) -> list[str]:
    """Problems of one shard's `(views, n)` parameters: bounds, and partners outside the row's mixup block."""
    try:
        check_params(params.reshape(-1), spec.augment.frames, shard_clips)
    except ValueError as error:
        return [str(error)]
    rows = np.broadcast_to(np.arange(shard_clips), params.shape)
    partners = params["partner_row"]
    block = spec.augment.mixup_block_clips
    outside = (partners >= 0) & ((partners // block != rows // block) | (partners == rows))
    if outside.any():
        view, row = np.argwhere(outside)[0]
        return [f"view {view} row {shard_start + row}: partner {partners[view, row]} outside its mixup block"]
    return []


def _check_provenance(store: TeacherStore, manifest, augment: AugmentConfig | None) -> list[str]:
    spec, problems = store.spec, []
    recorded = str(store.file.attrs["fingerprint"])
    if recorded != spec.fingerprint():
        problems.append(f"recorded fingerprint {recorded} does not match the recorded settings "
                        f"({spec.fingerprint()}): attributes were edited after the pass")
    if spec.manifest_fingerprint != manifest.fingerprint:
        problems.append(f"made from shards with manifest fingerprint {spec.manifest_fingerprint}, but "
                        f"{manifest.root} has {manifest.fingerprint}")
    if augment is not None and augment != spec.augment:
        problems.append("augmentation config differs from the expected one: "
                        + "; ".join(spec.augment.differences(augment)))
    return problems


def _check_shapes(store: TeacherStore) -> list[str]:
    spec, file, clips = store.spec, store.file, store.num_rows
    shapes = {
        "topk_values": (spec.num_views, clips, spec.top_k),
        "topk_indices": (spec.num_views, clips, spec.top_k),
        "view_params": (spec.num_views, clips),
        "keys": (clips,),
        "chunks": (clips,),
        "shard_offsets": (len(store.shard_names) + 1,),
    }
    if spec.official:
        shapes.update(shift_samples=(spec.num_views, clips), seeds=(spec.num_views, clips))
    problems = [f"{name} has shape {file[name].shape}, expected {shape}" for name, shape in shapes.items()
                if file[name].shape != shape]
    if store.shard_offsets[-1] != clips:
        problems.append(f"shard_offsets end at {store.shard_offsets[-1]}, not at the {clips} rows")
    return problems


def _check_keys(store: TeacherStore, keys: list[str], manifest) -> list[str]:
    """The store's rows against the chunk layout of the manifest (every chunk of every sample once, in order)."""
    problems = []
    chunk_samples = store.spec.augment.clip_samples
    rows = list(zip(keys, store.chunks().tolist()))
    duplicates = sorted(f"{key}#{chunk}" for (key, chunk), count in Counter(rows).items() if count > 1)
    if duplicates:
        problems.append(f"(key, chunk) rows stored more than once: {_examples(duplicates)}")
    layouts = [shard_chunks(shard, chunk_samples) for shard in manifest.shards]
    if store.spec.official:  # the chunks the release covers, in the shards' order
        return problems + _check_covered_keys(store, layouts, manifest)
    expected = [(key, int(chunk)) for layout in layouts for key, chunk in zip(layout.keys, layout.chunks)]
    absent, foreign = sorted(set(expected) - set(rows)), sorted(set(rows) - set(expected))
    if absent:
        problems.append(f"chunks of the manifest's samples missing from the store: "
                        f"{_examples(f'{key}#{chunk}' for key, chunk in absent)}")
    if foreign:
        problems.append(f"store rows not in the manifest's chunk layout: "
                        f"{_examples(f'{key}#{chunk}' for key, chunk in foreign)}")
    layout = ([shard.name for shard in manifest.shards], [len(chunks) for chunks in layouts])
    if not absent and not foreign and (
        rows != expected or (store.shard_names, np.diff(store.shard_offsets).tolist()) != layout
    ):
        problems.append("rows or shards are not in the manifest's order")
    return problems


def _check_covered_keys(store: TeacherStore, layouts: list[ShardChunks], manifest) -> list[str]:
    """A store of released outputs: per manifest shard, its rows are chunks of that shard, in its order."""
    if store.shard_names != [shard.name for shard in manifest.shards]:
        return [f"shards {_examples(store.shard_names)} are not the manifest's {_examples(s.name for s in manifest.shards)}"]
    problems = []
    for shard, layout in zip(manifest.shards, layouts):
        start, stop = store.shard_rows(shard.name)
        try:
            covered_chunks(layout, store.keys(start, stop), store.chunks(start, stop))
        except ValueError as error:
            problems.append(f"shard {shard.name}: {error}")
    return problems


def _chunk_lengths(store: TeacherStore, manifest) -> np.ndarray:
    """`(rows,)` own samples of each store row's chunk (before padding)."""
    chunk_samples, lengths = store.spec.augment.clip_samples, []
    for shard in manifest.shards:
        start, stop = store.shard_rows(shard.name)
        layout = covered_chunks(shard_chunks(shard, chunk_samples), store.keys(start, stop), store.chunks(start, stop))
        sample_lengths = np.asarray(shard.lengths, np.int64)[layout.sample_rows]
        lengths.append(np.minimum(sample_lengths - layout.chunks * chunk_samples, chunk_samples))
    return np.concatenate(lengths) if lengths else np.zeros(0, np.int64)


def _check_entries(store: TeacherStore) -> list[str]:
    spec, file, clips = store.spec, store.file, store.num_rows
    counts: Counter = Counter()
    for view in range(spec.num_views):
        for start in range(0, clips, CHUNK_CLIPS):
            counts.update(_check_rows(spec, file, view, start, min(start + CHUNK_CLIPS, clips)))
    problems = [f"{count} (row, view) entries with {name}" for name, count in counts.items() if count]
    for i, name in enumerate(store.shard_names):
        start, stop = store.shard_offsets[i], store.shard_offsets[i + 1]
        params = file["view_params"][:, start:stop]
        problems += [f"shard {name}: {problem}" for problem in _check_params(spec, params, start, stop - start)]
    if spec.official:
        largest = int(np.abs(file["shift_samples"][...].astype(np.int64)).max(initial=0))
        if largest > spec.augment.clip_samples // 2:
            problems.append(f"a waveform shift of {largest} samples, more than half the {spec.augment.clip_samples}")
    return problems


def _check_resampled(store: TeacherStore, keys: list[str], resample: int, manifest) -> list[str]:
    """Re-draw up to `resample` evenly spread parameter records: from the recorded config and seed (each row's
    parameters are drawn under `chunk_rng_key`), or in a store of released outputs from each view's stored seed."""
    spec, file, clips = store.spec, store.file, store.num_rows
    total = clips * spec.num_views
    if not total or resample <= 0:
        return []
    shard_of_row = np.repeat(np.arange(len(store.shard_names)), np.diff(store.shard_offsets))
    picks = np.unique(np.linspace(0, total - 1, num=min(resample, total)).astype(np.int64))
    chunks, mismatched = store.chunks(), []
    lengths = _chunk_lengths(store, manifest) if spec.official else None
    for flat in picks:
        view, row = divmod(int(flat), clips)
        start, stop = store.shard_offsets[shard_of_row[row]], store.shard_offsets[shard_of_row[row] + 1]
        rng_key = chunk_rng_key(keys[row], int(chunks[row]))
        if spec.official:
            length = int(lengths[row])
            drawn = official_view(int(file["seeds"][view, row]), length,
                                  spec.augment.frames if spec.view_source == OFFICIAL_BATCH else num_frames(length))
            differs = (file["view_params"][view, row] != drawn.params()
                       or int(file["shift_samples"][view, row]) != drawn.shift_samples)
        else:
            differs = file["view_params"][view, row] != sample_view(spec.augment, spec.seed, rng_key, view,
                                                                    row - start, stop - start)
        if differs:
            mismatched.append(f"{rng_key}/view {view}")
    if not mismatched:
        return []
    made_from = ("the stored seeds and the reference's draws" if spec.official
                 else "the recorded augmentation config and seed")
    return [f"{len(mismatched)} of {len(picks)} re-drawn parameter records differ from the stored ones (they were "
            f"not made from {made_from}): {_examples(mismatched)}"]


def verify(path: str | Path, shards_dir: str | Path, augment: AugmentConfig | None = None, resample: int = 4096):
    """Check a store against its shards; return `info(path)`, or raise StoreError listing every problem.

    Checks: readable and complete file; recorded fingerprint; shard manifest fingerprint; every chunk of every
    manifest sample present exactly once, in the manifest's order, and no other row (a store of released outputs:
    chunks of the manifest's samples, once each, in its order); every (row, view) written; values finite within
    [0, 1] and descending; indices within [0, num_classes) and distinct; augmentation parameters within bounds with
    partners in the row's mixup block; `resample` parameter records re-drawn from the recorded config and seed (or
    the stored seeds of released outputs) equal to the stored ones; and, when `augment` is given, the recorded
    augmentation config equal to it.
    """
    from ced_train.data import read_manifest

    path = Path(path)
    manifest = read_manifest(shards_dir)
    store = TeacherStore(path)
    try:
        shape_problems = _check_shapes(store)
        problems = _check_provenance(store, manifest, augment) + shape_problems
        if not shape_problems:  # the content checks index by the shapes
            keys = store.keys()
            problems += _check_keys(store, keys, manifest) + _check_entries(store)
            problems += _check_resampled(store, keys, resample, manifest)
    except OSError as error:
        problems = [f"unreadable data (truncated file?): {error}"]
    finally:
        store.close()
    if problems:
        raise StoreError(f"verify {path}: FAILED\n - " + "\n - ".join(problems))
    return info(path)


def _read_augment_yaml(path: str) -> AugmentConfig:
    """An augmentation config file (`configs/augment/*.yaml`), composed by Hydra so that its `defaults:` apply."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"--augment: no such file {path}")
    with initialize_config_dir(config_dir=str(path.parent), version_base="1.3"):
        values = OmegaConf.to_container(compose(path.stem), resolve=True)
    values.pop("_target_", None)
    try:
        return AugmentConfig(**values)
    except TypeError as error:
        raise ValueError(f"{path}: not an augmentation config ({error})") from None


def _import(args) -> int:
    """`import-official`: write the store, print the accounting, then `verify` it against the shards."""
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise StoreError(f"--out {out} exists; pass --overwrite to replace it")
    report = import_official(args.logits_dir, args.shards, out, time_axis=args.time_axis, progress=args.progress)
    counts = report.counts()
    print(f"release: {report.release_rows} rows per view, {report.views} views; shards: {report.chunks} chunk rows")
    print(f"stored {report.rows} chunk rows x {report.views} views; left out: "
          + (", ".join(f"{count} {kind}s" for kind, count in sorted(counts.items())) or "nothing")
          + (f" (listed in {report.accounting})" if counts else ""))
    summary = verify(out, args.shards, resample=4096)
    print(f"verify {out}: ok ({summary['rows']} chunk rows x {summary['views']} views, all present)")
    print(f"store: {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ced_train.store", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    info_parser = commands.add_parser("info", help="counts, sizes, coverage, teachers of a store")
    info_parser.add_argument("path")
    verify_parser = commands.add_parser("verify", help="check a store against its shards; non-zero exit on problems")
    verify_parser.add_argument("path")
    verify_parser.add_argument("--shards", required=True, help="shard directory (with manifest.json)")
    verify_parser.add_argument("--augment", help="augmentation yaml the store must match (configs/augment/ced.yaml)")
    verify_parser.add_argument("--resample", type=int, default=4096, help="parameter records to re-draw and compare")
    import_parser = commands.add_parser(
        "import-official", help="the paper's released teacher outputs (logits_ep*_*.h5 + .parquet) as a store")
    import_parser.add_argument("logits_dir", help="e.g. logits/ensemble5014/balanced/chunk_10")
    import_parser.add_argument("--shards", required=True, help="shard directory of the clips the release covers")
    import_parser.add_argument("--out", required=True, help="store file to write")
    import_parser.add_argument("--time-axis", choices=sorted(TIME_AXES), default="batch",
                               help="time-mask axis of the reference's draws: the padded batch's 1001 frames "
                               "(its AudioSet runs, batch 128) or each chunk's own frames (a release made at batch 1)")
    import_parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    import_parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    try:
        if args.command == "import-official":
            return _import(args)
        if args.command == "info":
            summary = info(args.path)
        else:
            augment = _read_augment_yaml(args.augment) if args.augment else None
            summary = verify(args.path, args.shards, augment=augment, resample=args.resample)
            print(f"verify {args.path}: ok ({summary['rows']} chunk rows x {summary['views']} views, all present)")
    except (StoreError, OSError, ValueError) as error:  # OSError: HDF5 data unreadable past an intact header
        print(f"error: {error}", file=sys.stderr)
        return 1
    for name, value in summary.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        elif isinstance(value, (list, dict)):
            value = json.dumps(value)
        print(f"{name:28s} {value}")
    return 0
