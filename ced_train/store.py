"""The teacher store: one HDF5 file of per-(clip, view) top-k teacher outputs and the augmentation that produced
each view. Writer (part files, merge), reader and checks side by side; layout and reasons in docs/store.md.

    python -m ced_train.store info PATH
    python -m ced_train.store verify PATH --shards DIR [--augment configs/augment/ced.yaml]

Layout (format version 1), clips in shard-manifest order then each shard's stored order:

    keys           (clips,)            S<n>     clip keys, UTF-8
    shard_names    (shards,)           S<n>     shard names, manifest order
    shard_offsets  (shards + 1,)       int64    shard i holds clips [offsets[i], offsets[i + 1])
    topk_values    (views, clips, k)   float16  ensemble probabilities, descending
    topk_indices   (views, clips, k)   int16    class indices; -1 marks a (clip, view) never written
    view_params    (views, clips)      13-byte compound `augment.VIEW_PARAMS_DTYPE`

Chunks hold one view of `CHUNK_CLIPS` consecutive clips: the student reads one view of consecutive clips of a shard.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ced_train.augment import VIEW_PARAMS_DTYPE, AugmentConfig, check_params, sample_view

FORMAT_VERSION = 1
CHUNK_CLIPS = 1024
INDEX_DTYPE = np.dtype("<i2")
VALUE_DTYPE = np.dtype("<f2")
MISSING_INDEX = -1
DATASETS = ("keys", "shard_names", "shard_offsets", "topk_values", "topk_indices", "view_params")


class StoreError(RuntimeError):
    """A store that is unreadable, incomplete or does not match what it is used with; the message says what."""


@dataclass(frozen=True)
class StoreSpec:
    """What a store is made from; its `fingerprint` names it, and a reused part or store must match it.

    Args:
        manifest_fingerprint: fingerprint of the shard manifest the pass read.
        augment: the augmentation config the views were sampled from.
        seed: the global seed keying the counter-based parameter generator.
        teachers: one `{"file": name, "sha256": hex, ...}` per teacher checkpoint, in ensemble order.
        averaging: how the ensemble combines teachers ("probs" or "logits").
        top_k: outputs kept per (clip, view).
        num_views: views per clip.
        num_classes: classes of the teachers.
    """

    manifest_fingerprint: str
    augment: AugmentConfig
    seed: int
    teachers: tuple[dict, ...]
    averaging: str
    top_k: int
    num_views: int
    num_classes: int

    def __post_init__(self) -> None:
        if not 0 < self.num_classes <= np.iinfo(INDEX_DTYPE).max:
            raise ValueError(f"num_classes={self.num_classes} does not fit the store's int16 class indices")
        if not 0 < self.top_k <= self.num_classes:
            raise ValueError(f"top_k={self.top_k} must lie in [1, num_classes={self.num_classes}]")
        if self.num_views < 1:
            raise ValueError(f"num_views={self.num_views} must be at least 1")

    def to_attrs(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "fingerprint": self.fingerprint(),
            "manifest_fingerprint": self.manifest_fingerprint,
            "augment": self.augment.to_json(),
            "seed": self.seed,
            "teachers": json.dumps(list(self.teachers), sort_keys=True),
            "averaging": self.averaging,
            "top_k": self.top_k,
            "num_views": self.num_views,
            "num_classes": self.num_classes,
        }

    @classmethod
    def from_attrs(cls, attrs) -> "StoreSpec":
        return cls(
            manifest_fingerprint=str(attrs["manifest_fingerprint"]),
            augment=AugmentConfig.from_json(str(attrs["augment"])),
            seed=int(attrs["seed"]),
            teachers=tuple(json.loads(str(attrs["teachers"]))),
            averaging=str(attrs["averaging"]),
            top_k=int(attrs["top_k"]),
            num_views=int(attrs["num_views"]),
            num_classes=int(attrs["num_classes"]),
        )

    def fingerprint(self) -> str:
        identity = dataclasses.asdict(self) | {"augment": self.augment.to_json(), "format_version": FORMAT_VERSION}
        return hashlib.sha256(json.dumps(identity, sort_keys=True, default=list).encode()).hexdigest()[:16]

    def differences(self, other: "StoreSpec") -> list[str]:
        """Readable `field: mine != theirs` lines (augmentation compared field by field)."""
        lines = [f"augment.{line}" for line in self.augment.differences(other.augment)]
        for field in dataclasses.fields(self):
            if field.name != "augment" and getattr(self, field.name) != getattr(other, field.name):
                lines.append(f"{field.name}: {getattr(self, field.name)!r} != {getattr(other, field.name)!r}")
        return lines


# ---------------------------------------------------------------------------------------------------- writing


def _atomic_target(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def _finish_atomically(tmp: Path, path: Path) -> None:
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _create_layout(file: h5py.File, spec: StoreSpec, keys: list[str], shard_names: list[str], offsets: list[int]):
    num_clips = len(keys)
    file.attrs.update(spec.to_attrs())
    file.attrs["num_clips"] = num_clips
    encoded = [key.encode() for key in keys]
    file.create_dataset("keys", data=np.array(encoded, dtype=f"S{max(map(len, encoded), default=1)}"))
    names = [name.encode() for name in shard_names]
    file.create_dataset("shard_names", data=np.array(names, dtype=f"S{max(map(len, names), default=1)}"))
    file.create_dataset("shard_offsets", data=np.asarray(offsets, dtype=np.int64))
    shape = (spec.num_views, num_clips)
    # HDF5 refuses chunks larger than the data: a part of a shard without clips is stored contiguous (and empty).
    chunk = (1, min(CHUNK_CLIPS, num_clips)) if num_clips else None
    topk_chunk = chunk + (spec.top_k,) if chunk else None
    file.create_dataset("topk_values", shape=shape + (spec.top_k,), dtype=VALUE_DTYPE, chunks=topk_chunk)
    file.create_dataset(
        "topk_indices", shape=shape + (spec.top_k,), dtype=INDEX_DTYPE, chunks=topk_chunk, fillvalue=MISSING_INDEX
    )
    file.create_dataset("view_params", shape=shape, dtype=VIEW_PARAMS_DTYPE, chunks=chunk)


def write_part(
    path: str | Path,
    spec: StoreSpec,
    shard_name: str,
    keys: list[str],
    view_params: np.ndarray,
    topk_values: np.ndarray,
    topk_indices: np.ndarray,
) -> Path:
    """Write the complete result for one shard (all views) atomically: temporary name, fsync, rename.

    Args:
        keys: the shard's clip keys in stored order, `n` of them.
        view_params: `(views, n)` `VIEW_PARAMS_DTYPE`.
        topk_values: `(views, n, k)` probabilities (stored as float16); topk_indices: `(views, n, k)` class indices.
    """
    path = Path(path)
    expected = (spec.num_views, len(keys))
    for name, array, shape in (
        ("view_params", view_params, expected),
        ("topk_values", topk_values, expected + (spec.top_k,)),
        ("topk_indices", topk_indices, expected + (spec.top_k,)),
    ):
        if array.shape != shape:
            raise ValueError(f"part {shard_name}: {name} has shape {array.shape}, expected {shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _atomic_target(path)
    with h5py.File(tmp, "w") as file:
        _create_layout(file, spec, keys, [shard_name], [0, len(keys)])
        file["view_params"][...] = view_params
        file["topk_values"][...] = topk_values.astype(VALUE_DTYPE)
        file["topk_indices"][...] = topk_indices.astype(INDEX_DTYPE)
    _finish_atomically(tmp, path)
    return path


def part_is_complete(path: str | Path, spec: StoreSpec, shard_name: str, num_clips: int) -> bool:
    """True if `path` is a finished part of this spec for this shard.

    Raises:
        StoreError: the part exists but was made from something else (a different spec, shard or clip count);
            it is never silently replaced.
    """
    path = Path(path)
    if not path.exists():
        return False
    try:
        with h5py.File(path, "r") as file:
            found = StoreSpec.from_attrs(file.attrs)
            names = [name.decode() for name in file["shard_names"][:]]
            clips = int(file.attrs["num_clips"])
    except (OSError, KeyError) as error:
        raise StoreError(f"part {path} is unreadable ({error}); delete it to redo shard {shard_name}") from error
    if found.fingerprint() != spec.fingerprint():
        raise StoreError(
            f"part {path} was written for another pass (fingerprint {found.fingerprint()}, this pass "
            f"{spec.fingerprint()}): {'; '.join(found.differences(spec))}. Delete it (or all of {path.parent}), or "
            "let the pass replace it (teach.overwrite=true)."
        )
    if names != [shard_name] or clips != num_clips:
        raise StoreError(f"part {path} holds {names} with {clips} clips, expected {shard_name} with {num_clips}")
    return True


def merge_parts(path: str | Path, spec: StoreSpec, parts: list[str | Path]) -> Path:
    """Concatenate part files (in the given order: the manifest's shard order) into the store at `path`, atomically.

    Every part must carry `spec`'s fingerprint.
    """
    path = Path(path)
    headers = []
    for part in parts:
        with h5py.File(part, "r") as file:
            if file.attrs["fingerprint"] != spec.fingerprint():
                raise StoreError(f"part {part} has fingerprint {file.attrs['fingerprint']}, expected "
                                 f"{spec.fingerprint()}")
            headers.append(([key.decode() for key in file["keys"][:]], file["shard_names"][0].decode()))
    keys = [key for part_keys, _ in headers for key in part_keys]
    offsets = np.cumsum([0] + [len(part_keys) for part_keys, _ in headers]).tolist()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _atomic_target(path)
    with h5py.File(tmp, "w") as out:
        _create_layout(out, spec, keys, [name for _, name in headers], offsets)
        for part, start, stop in zip(parts, offsets[:-1], offsets[1:]):
            with h5py.File(part, "r") as file:
                for name in ("topk_values", "topk_indices", "view_params"):
                    out[name][:, start:stop] = file[name][...]
    _finish_atomically(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------------- reading


class TeacherStore:
    """Read access to a store. Picklable: the HDF5 handle opens on first use in each process (DataLoader worker).

    Args:
        path: the store file.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file: h5py.File | None = None
        try:
            self._read_header(self._open())
        except BaseException:
            self.close()  # a refused file is not left open
            raise
        self._shard_index = {name: i for i, name in enumerate(self.shard_names)}

    def _read_header(self, file: h5py.File) -> None:
        try:
            version = int(file.attrs.get("format_version", -1))
            if version != FORMAT_VERSION:
                raise StoreError(f"{self.path}: format version {version}, this code reads {FORMAT_VERSION}")
            missing = [name for name in DATASETS if name not in file]
            if missing:
                raise StoreError(f"{self.path}: missing datasets {missing}")
            self.spec = StoreSpec.from_attrs(file.attrs)
            self.shard_names = [name.decode() for name in file["shard_names"][:]]
            self.shard_offsets = file["shard_offsets"][:].tolist()
            self.num_clips = int(file.attrs["num_clips"])
        except KeyError as error:
            raise StoreError(f"{self.path}: attribute or dataset {error} missing: not a teacher store") from error

    def _open(self) -> h5py.File:
        if self._file is None:
            if not self.path.is_file():
                raise StoreError(f"teacher store not found: {self.path}")
            try:
                self._file = h5py.File(self.path, "r")
            except OSError as error:
                raise StoreError(f"{self.path}: cannot open as HDF5 (truncated or not a store): {error}") from error
        return self._file

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None}

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "TeacherStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def num_views(self) -> int:
        return self.spec.num_views

    @property
    def top_k(self) -> int:
        return self.spec.top_k

    def keys(self, start: int = 0, stop: int | None = None) -> list[str]:
        return [key.decode() for key in self._open()["keys"][start:stop]]

    def shard_rows(self, shard_name: str) -> tuple[int, int]:
        """`[start, stop)` store rows of shard `shard_name` (its clips in stored order)."""
        if shard_name not in self._shard_index:
            raise StoreError(f"{self.path}: no shard {shard_name!r} (store holds {len(self.shard_names)} shards)")
        i = self._shard_index[shard_name]
        return self.shard_offsets[i], self.shard_offsets[i + 1]

    def read(self, view: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One view of store rows `[start, stop)` → (topk_values float16 (n, k), topk_indices int16 (n, k),
        view_params (n,))."""
        if not 0 <= view < self.num_views:
            raise IndexError(f"{self.path}: view {view} outside [0, {self.num_views})")
        file = self._open()
        try:
            return (
                file["topk_values"][view, start:stop],
                file["topk_indices"][view, start:stop],
                file["view_params"][view, start:stop],
            )
        except OSError as error:
            raise StoreError(f"{self.path}: read of view {view}, rows {start}:{stop} failed: {error}") from error


def topk_to_dense(values: np.ndarray, indices: np.ndarray, num_classes: int, fill: float = 0.0) -> np.ndarray:
    """`(n, k)` top-k values and class indices → `(n, num_classes)` float32 targets; classes outside the top-k get
    `fill` (0, the paper's default)."""
    dense = np.full((values.shape[0], num_classes), fill, dtype=np.float32)
    np.put_along_axis(dense, indices.astype(np.int64), values.astype(np.float32), axis=1)
    return dense


# ---------------------------------------------------------------------------------------------------- checks


def info(path: str | Path) -> dict:
    """Summary of a store: counts, sizes, coverage, provenance."""
    with TeacherStore(path) as store:
        indices = store._open()["topk_indices"]
        written = sum(
            int(np.count_nonzero(indices[view, start : start + CHUNK_CLIPS, 0] != MISSING_INDEX))
            for view in range(store.num_views)
            for start in range(0, store.num_clips, CHUNK_CLIPS)
        )
        spec = store.spec
        clip_views = max(1, store.num_clips * spec.num_views)
        return {
            "path": str(store.path),
            "format_version": FORMAT_VERSION,
            "fingerprint": spec.fingerprint(),
            "manifest_fingerprint": spec.manifest_fingerprint,
            "clips": store.num_clips,
            "shards": len(store.shard_names),
            "views": spec.num_views,
            "top_k": spec.top_k,
            "num_classes": spec.num_classes,
            "coverage": written / clip_views,
            "file_bytes": store.path.stat().st_size,
            "file_bytes_per_clip_view": store.path.stat().st_size / clip_views,
            "payload_bytes_per_clip_view": spec.top_k * (VALUE_DTYPE.itemsize + INDEX_DTYPE.itemsize)
            + VIEW_PARAMS_DTYPE.itemsize,
            "bytes_per_view": store.path.stat().st_size / spec.num_views,
            "teachers": list(spec.teachers),
            "averaging": spec.averaging,
            "seed": spec.seed,
            "augment": json.loads(spec.augment.to_json()),
        }


def _examples(items, limit: int = 5) -> str:
    items = list(items)
    shown = ", ".join(str(item) for item in items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def _check_rows(spec: StoreSpec, file: h5py.File, view: int, start: int, stop: int) -> dict[str, int]:
    """Counts of bad (clip, view) entries among store rows `[start, stop)` of one view."""
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
    """Problems of one shard's `(views, n)` parameters: bounds, and partners outside the clip's mixup block."""
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
    recorded = str(store._open().attrs["fingerprint"])
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
    spec, file, clips = store.spec, store._open(), store.num_clips
    shapes = {
        "topk_values": (spec.num_views, clips, spec.top_k),
        "topk_indices": (spec.num_views, clips, spec.top_k),
        "view_params": (spec.num_views, clips),
        "keys": (clips,),
        "shard_offsets": (len(store.shard_names) + 1,),
    }
    problems = [f"{name} has shape {file[name].shape}, expected {shape}" for name, shape in shapes.items()
                if file[name].shape != shape]
    if store.shard_offsets[-1] != clips:
        problems.append(f"shard_offsets end at {store.shard_offsets[-1]}, not at the {clips} clips")
    return problems


def _check_keys(store: TeacherStore, keys: list[str], manifest) -> list[str]:
    problems = []
    duplicates = sorted(key for key, count in Counter(keys).items() if count > 1)
    if duplicates:
        problems.append(f"keys stored more than once: {_examples(duplicates)}")
    manifest_keys = [key for shard in manifest.shards for key in shard.keys]
    absent, foreign = sorted(set(manifest_keys) - set(keys)), sorted(set(keys) - set(manifest_keys))
    if absent:
        problems.append(f"manifest keys missing from the store: {_examples(absent)}")
    if foreign:
        problems.append(f"store keys not in the manifest: {_examples(foreign)}")
    layout = ([shard.name for shard in manifest.shards], [shard.num_samples for shard in manifest.shards])
    if not absent and not foreign and (
        keys != manifest_keys or (store.shard_names, np.diff(store.shard_offsets).tolist()) != layout
    ):
        problems.append("keys or shards are not in the manifest's order")
    return problems


def _check_entries(store: TeacherStore) -> list[str]:
    spec, file, clips = store.spec, store._open(), store.num_clips
    counts: Counter = Counter()
    for view in range(spec.num_views):
        for start in range(0, clips, CHUNK_CLIPS):
            counts.update(_check_rows(spec, file, view, start, min(start + CHUNK_CLIPS, clips)))
    problems = [f"{count} (clip, view) entries with {name}" for name, count in counts.items() if count]
    for i, name in enumerate(store.shard_names):
        start, stop = store.shard_offsets[i], store.shard_offsets[i + 1]
        params = file["view_params"][:, start:stop]
        problems += [f"shard {name}: {problem}" for problem in _check_params(spec, params, start, stop - start)]
    return problems


def _check_resampled(store: TeacherStore, keys: list[str], resample: int) -> list[str]:
    """Re-draw up to `resample` evenly spread parameter records from the recorded config and seed."""
    spec, file, clips = store.spec, store._open(), store.num_clips
    total = clips * spec.num_views
    if not total or resample <= 0:
        return []
    shard_of_row = np.repeat(np.arange(len(store.shard_names)), np.diff(store.shard_offsets))
    picks = np.unique(np.linspace(0, total - 1, num=min(resample, total)).astype(np.int64))
    mismatched = []
    for flat in picks:
        view, row = divmod(int(flat), clips)
        start, stop = store.shard_offsets[shard_of_row[row]], store.shard_offsets[shard_of_row[row] + 1]
        expected = sample_view(spec.augment, spec.seed, keys[row], view, row - start, stop - start)
        if file["view_params"][view, row] != expected:
            mismatched.append(f"{keys[row]}/view {view}")
    if not mismatched:
        return []
    return [f"{len(mismatched)} of {len(picks)} re-drawn parameter records differ from the stored ones (the recorded "
            f"augmentation config or seed is not the one the views were made with): {_examples(mismatched)}"]


def verify(path: str | Path, shards_dir: str | Path, augment: AugmentConfig | None = None, resample: int = 4096):
    """Check a store against its shards; return `info(path)`, or raise StoreError listing every problem.

    Checks: readable and complete file; recorded fingerprint; shard manifest fingerprint; every manifest key present
    exactly once, in the manifest's order, and no other key; every (clip, view) written; values finite within
    [0, 1] and descending; indices within [0, num_classes) and distinct; augmentation parameters within bounds with
    partners in the clip's mixup block; `resample` parameter records re-drawn from the recorded config and seed equal
    to the stored ones; and, when `augment` is given, the recorded augmentation config equal to it.
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
            problems += _check_resampled(store, keys, resample)
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
    args = parser.parse_args(argv)
    try:
        if args.command == "info":
            summary = info(args.path)
        else:
            augment = _read_augment_yaml(args.augment) if args.augment else None
            summary = verify(args.path, args.shards, augment=augment, resample=args.resample)
            print(f"verify {args.path}: ok ({summary['clips']} clips x {summary['views']} views, all present)")
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


if __name__ == "__main__":
    sys.exit(main())
