"""The store's on-disk layout, its format version, the spec that names a store, and the reader `TeacherStore`.

Layout (format version 2). A row is one 10 s chunk of one sample (`ced_train.data.chunks`: every chunk of a
sample, the last one kept when at least half a chunk); rows in shard-manifest order, then each shard's stored sample
order, then chunk order:

    keys           (rows,)             S<n>     sample key of each row, UTF-8 (repeated for a sample's chunks)
    chunks         (rows,)             int32    chunk index of each row within its sample
    shard_names    (shards,)           S<n>     shard names, manifest order
    shard_offsets  (shards + 1,)       int64    shard i holds rows [offsets[i], offsets[i + 1])
    topk_values    (views, rows, k)    float16  ensemble probabilities, descending
    topk_indices   (views, rows, k)    int16    class indices; -1 marks a (row, view) never written
    view_params    (views, rows)       13-byte compound `augment.VIEW_PARAMS_DTYPE`

Stores of the paper's released outputs (`view_source` "official:batch" or "official:chunk", `store.official`) add

    shift_samples  (views, rows)       int32    circular shift of the chunk's own samples (`augment.shift_chunk`)
    seeds          (views, rows)       int32    the reference's seed of each (row, view), from which both were drawn

and hold the rows the release covers, a subsequence of the shards' chunk rows; a teacher-pass store ("sampled")
holds every chunk row. Format 1 had one row per clip (its first 10 s only). HDF5 chunks hold one view of `CHUNK_CLIPS` consecutive rows: the
student reads one view of consecutive rows of a shard. Part files (one shard each, `writing.write_part`) have the same
layout.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ced_train.augment import VIEW_PARAMS_DTYPE, AugmentConfig

FORMAT_VERSION = 2
CHUNK_CLIPS = 1024
INDEX_DTYPE = np.dtype("<i2")
VALUE_DTYPE = np.dtype("<f2")
MISSING_INDEX = -1
DATASETS = ("keys", "chunks", "shard_names", "shard_offsets", "topk_values", "topk_indices", "view_params")
OFFICIAL_DATASETS = ("shift_samples", "seeds")
SAMPLED = "sampled"  # views drawn by `augment.ViewSampler` from the recorded augment config and seed
# Views re-derived from the reference's seeds (`store.official`), its time-mask axis the padded batch's 1001 frames
# or each chunk's own frames.
OFFICIAL_BATCH, OFFICIAL_CHUNK = "official:batch", "official:chunk"
VIEW_SOURCES = (SAMPLED, OFFICIAL_BATCH, OFFICIAL_CHUNK)
# The dtype the teachers computed in (the teacher pass's resolved `teach.precision`); None where it is not recorded.
TEACHER_DTYPES = ("bfloat16", "float16", "float32")


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
        top_k: outputs kept per (row, view).
        num_views: views per row (chunk).
        num_classes: classes of the teachers.
        view_source: how the views were made (`VIEW_SOURCES`).
        precision: the autocast dtype the teachers ran in (`TEACHER_DTYPES`); None where it is not known: the paper's
            released outputs, and stores written before it was recorded (their fingerprint leaves it out, so it is
            unchanged).
    """

    manifest_fingerprint: str
    augment: AugmentConfig
    seed: int
    teachers: tuple[dict, ...]
    averaging: str
    top_k: int
    num_views: int
    num_classes: int
    view_source: str = SAMPLED
    precision: str | None = None

    @property
    def official(self) -> bool:
        """Whether the views are the reference's, re-derived from its seeds (not drawn from `augment` and `seed`)."""
        return self.view_source != SAMPLED

    def __post_init__(self) -> None:
        if self.view_source not in VIEW_SOURCES:
            raise ValueError(f"view_source={self.view_source!r} must be one of {VIEW_SOURCES}")
        if self.precision is not None and self.precision not in TEACHER_DTYPES:
            raise ValueError(f"precision={self.precision!r} must be one of {TEACHER_DTYPES} or None (not recorded)")
        if not 0 < self.num_classes <= np.iinfo(INDEX_DTYPE).max:
            raise ValueError(f"num_classes={self.num_classes} does not fit the store's int16 class indices")
        if not 0 < self.top_k <= self.num_classes:
            raise ValueError(f"top_k={self.top_k} must lie in [1, num_classes={self.num_classes}]")
        if self.num_views < 1:
            raise ValueError(f"num_views={self.num_views} must be at least 1")

    def to_attrs(self) -> dict:
        attrs = {
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
            "view_source": self.view_source,
        }
        return attrs if self.precision is None else attrs | {"precision": self.precision}

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
            view_source=str(attrs["view_source"]),
            precision=str(attrs["precision"]) if "precision" in attrs else None,
        )

    def fingerprint(self) -> str:
        identity = dataclasses.asdict(self) | {"augment": self.augment.to_json(), "format_version": FORMAT_VERSION}
        if self.precision is None:  # the fingerprint of a store written before the precision was recorded
            del identity["precision"]
        return hashlib.sha256(json.dumps(identity, sort_keys=True, default=list).encode()).hexdigest()[:16]

    def differences(self, other: "StoreSpec") -> list[str]:
        """Readable `field: mine != theirs` lines (augmentation compared field by field)."""
        def show(value) -> str:
            return "not recorded" if value is None else repr(value)

        lines = [f"augment.{line}" for line in self.augment.differences(other.augment)]
        for field in dataclasses.fields(self):
            mine, theirs = getattr(self, field.name), getattr(other, field.name)
            if field.name != "augment" and mine != theirs:
                lines.append(f"{field.name}: {show(mine)} != {show(theirs)}")
        return lines


def create_layout(file: h5py.File, spec: StoreSpec, keys: list[str], chunks: np.ndarray, shard_names: list[str],
                  offsets: list[int]):
    """Write the attributes and index datasets into a new file and create the (unfilled) per-view datasets; `keys`
    and `chunks` name the rows (see the module docstring)."""
    num_rows = len(keys)
    if len(chunks) != num_rows:
        raise ValueError(f"{len(keys)} row keys but {len(chunks)} chunk indices")
    file.attrs.update(spec.to_attrs())
    file.attrs["num_rows"] = num_rows
    encoded = [key.encode() for key in keys]
    file.create_dataset("keys", data=np.array(encoded, dtype=f"S{max(map(len, encoded), default=1)}"))
    file.create_dataset("chunks", data=np.asarray(chunks, dtype=np.int32))
    names = [name.encode() for name in shard_names]
    file.create_dataset("shard_names", data=np.array(names, dtype=f"S{max(map(len, names), default=1)}"))
    file.create_dataset("shard_offsets", data=np.asarray(offsets, dtype=np.int64))
    shape = (spec.num_views, num_rows)
    # HDF5 refuses chunks larger than the data: a part of a shard without clips is stored contiguous (and empty).
    chunk = (1, min(CHUNK_CLIPS, num_rows)) if num_rows else None
    topk_chunk = chunk + (spec.top_k,) if chunk else None
    file.create_dataset("topk_values", shape=shape + (spec.top_k,), dtype=VALUE_DTYPE, chunks=topk_chunk)
    file.create_dataset(
        "topk_indices", shape=shape + (spec.top_k,), dtype=INDEX_DTYPE, chunks=topk_chunk, fillvalue=MISSING_INDEX
    )
    file.create_dataset("view_params", shape=shape, dtype=VIEW_PARAMS_DTYPE, chunks=chunk)
    if spec.official:
        for name in OFFICIAL_DATASETS:
            file.create_dataset(name, shape=shape, dtype=np.int32, chunks=chunk)


def open_for_reading(path: str | Path) -> h5py.File:
    """Open a store or part read-only without HDF5's file locks. Lustre and NFS often refuse or mishandle those
    locks, and no reader needs them: every file is complete before it is renamed into place and never written
    again."""
    return h5py.File(path, "r", locking=False)


class TeacherStore:
    """Read access to a store. Picklable: the HDF5 handle opens on first use in each process (DataLoader worker).

    Args:
        path: the store file.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file: h5py.File | None = None
        try:
            self._read_header(self.file)
        except BaseException:
            self.close()  # a refused file is not left open
            raise
        self._shard_index = {name: i for i, name in enumerate(self.shard_names)}

    def _read_header(self, file: h5py.File) -> None:
        try:
            version = int(file.attrs.get("format_version", -1))
            if version != FORMAT_VERSION:
                older = 0 < version < FORMAT_VERSION
                raise StoreError(f"{self.path}: store format version {version}, this code reads {FORMAT_VERSION}"
                                 + ("; it was written before stores held every 10 s chunk: re-run the teacher pass "
                                    "with teach.overwrite=true" if older else ""))
            self.spec = StoreSpec.from_attrs(file.attrs)
            missing = [name for name in DATASETS + (OFFICIAL_DATASETS if self.spec.official else ())
                       if name not in file]
            if missing:
                raise StoreError(f"{self.path}: missing datasets {missing}")
            self.shard_names = [name.decode() for name in file["shard_names"][:]]
            self.shard_offsets = file["shard_offsets"][:].tolist()
            self.num_rows = int(file.attrs["num_rows"])
        except KeyError as error:
            raise StoreError(f"{self.path}: attribute or dataset {error} missing: not a teacher store") from error

    @property
    def file(self) -> h5py.File:
        """The open HDF5 file (opened in this process on first use), for readers of whole datasets (checks).

        A process forked after the file was opened (a DataLoader worker) opens its own handle: h5py does not support
        one HDF5 file handle used from two processes."""
        if self._file is not None and self._opened_by != os.getpid():
            self._file = None  # the parent's handle: left to the parent (dropping this copy closes nothing there)
        if self._file is None:
            self._opened_by = os.getpid()
            if not self.path.is_file():
                raise StoreError(f"teacher store not found: {self.path}")
            try:
                self._file = open_for_reading(self.path)
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
        """Sample keys of rows `[start, stop)`."""
        return [key.decode() for key in self.file["keys"][start:stop]]

    def chunks(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """`(n,)` int64 chunk indices of rows `[start, stop)`."""
        return self.file["chunks"][start:stop].astype(np.int64)

    def shard_rows(self, shard_name: str) -> tuple[int, int]:
        """`[start, stop)` store rows of shard `shard_name`."""
        if shard_name not in self._shard_index:
            raise StoreError(f"{self.path}: no shard {shard_name!r} (store holds {len(self.shard_names)} shards)")
        i = self._shard_index[shard_name]
        return self.shard_offsets[i], self.shard_offsets[i + 1]

    def read(self, view: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One view of store rows `[start, stop)` → (topk_values float16 (n, k), topk_indices int16 (n, k),
        view_params (n,))."""
        if not 0 <= view < self.num_views:
            raise IndexError(f"{self.path}: view {view} outside [0, {self.num_views})")
        file = self.file
        try:
            return (
                file["topk_values"][view, start:stop],
                file["topk_indices"][view, start:stop],
                file["view_params"][view, start:stop],
            )
        except OSError as error:
            raise StoreError(f"{self.path}: read of view {view}, rows {start}:{stop} failed: {error}") from error

    def mean_probabilities(self, max_blocks: int = 256) -> np.ndarray:
        """`(num_classes,)` float64 mean teacher probability of each class over the written (row, view) pairs; a
        class outside a view's top-k counts as 0 there (the loss's default fill).

        Reads each view in blocks of `CHUNK_CLIPS` rows (one HDF5 chunk each): all of them in stores of up to
        `max_blocks` blocks, else `max_blocks` blocks spread evenly over the rows (262,144 rows per view, plenty for
        a class mean, instead of the whole of an AS-2M store on every rank).
        """
        file = self.file
        starts = np.arange(0, self.num_rows, CHUNK_CLIPS)
        if len(starts) > max_blocks:
            starts = starts[np.linspace(0, len(starts) - 1, max_blocks).round().astype(np.int64)]
        sums = np.zeros(self.spec.num_classes, np.float64)
        written = 0
        for view in range(self.num_views):
            for start in starts.tolist():
                stop = min(start + CHUNK_CLIPS, self.num_rows)
                values = file["topk_values"][view, start:stop]
                indices = file["topk_indices"][view, start:stop]
                rows = indices[:, 0] != MISSING_INDEX
                written += int(rows.sum())
                sums += np.bincount(indices[rows].ravel().astype(np.int64), weights=values[rows].ravel(),
                                    minlength=self.spec.num_classes)
        if written == 0:
            raise StoreError(f"{self.path}: no (row, view) written: no teacher outputs to average")
        return sums / written

    def shift_samples(self, view: int, start: int, stop: int) -> np.ndarray:
        """`(n,)` int32 waveform shift of one view of rows `[start, stop)` (`augment.shift_chunk`); zeros in a
        store whose views shift frames only."""
        if not self.spec.official:
            return np.zeros(stop - start, np.int32)
        try:
            return self.file["shift_samples"][view, start:stop]
        except OSError as error:
            raise StoreError(f"{self.path}: read of view {view}, rows {start}:{stop} failed: {error}") from error


def topk_to_dense(values: np.ndarray, indices: np.ndarray, num_classes: int, fill: float = 0.0) -> np.ndarray:
    """`(n, k)` top-k values and class indices → `(n, num_classes)` float32 targets; classes outside the top-k get
    `fill` (0, the paper's default)."""
    dense = np.full((values.shape[0], num_classes), fill, dtype=np.float32)
    np.put_along_axis(dense, indices.astype(np.int64), values.astype(np.float32), axis=1)
    return dense
