"""The paper's released teacher outputs: the layout RicherMans/CED's `save_logits.py` writes, and each stored view's
augmentation re-derived from its seed.

Layout (`logits/ensemble5014/{balanced,full}/chunk_10/`): one pair of files per (view, rank),
`logits_ep{E}_{rank}.h5` with `topk_values` (rows, 20) float16 ensemble probabilities (descending), `topk_indexes`
(rows, 20) int16 class indices and `seeds` (rows,) int32, and beside it `logits_ep{E}_{rank}.parquet` with, row for
row, `filename` (the clip file's base name), `start` and `end` (float32 seconds of the 10 s chunk in that file).
`E` counts from 1; the ranks of one `E` together hold one view of every chunk. Rows are in loader order, not clip
order. The reference's student reads view `max(e mod N, 1)` in epoch `e` (1-based) of `N` views, so view `N` is never
used there.

A row's view, as the reference draws it (the teacher pass and its student alike): the global torch generator is
reseeded with the row's seed, then
1. `bernoulli(0.5)`: whether the waveform is shifted;
2. only when it is: a shift of `randint(round(-L/2), round(L/2) + 1)` samples, `L` the chunk's own length in samples
   (before any padding), applied as a circular roll of the chunk (positive moves content later);
3. `u1 = rand()`, `u2 = rand()`, shared by both SpecAugment masks (time mask of up to 192 frames first, then
   frequency mask of up to 24 bins): for an axis of `A` cells and a largest width `P`, the mask is
   `[start, start + width)` with `width = floor(u1 * P)` and `start = floor(u2 * (A - u1 * P))`, in float32, filled
   with 0 dB after the front end's `top_db` floor and before the mel BatchNorm.
The time axis `A` is the frame count of the padded batch the row was in: 1001 when its batch held a full 10 s chunk
(practically always at the reference's batch of 128 on AudioSet), the chunk's own frames at batch size 1.
`tests/fixtures/official_logits/` holds outputs of the reference code itself that these rules reproduce exactly.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm import tqdm

from ced_train.audio import SAMPLE_RATE
from ced_train.augment import VIEW_PARAMS_DTYPE, AugmentConfig
from ced_train.data import read_manifest
from ced_train.data.chunks import shard_chunks
from ced_train.data.shards import file_sha256, iter_records
from ced_train.extras import require
from ced_train.models.frontend import N_MELS, num_frames
from ced_train.store.format import OFFICIAL_BATCH, OFFICIAL_CHUNK, StoreError, StoreSpec, create_layout
from ced_train.store.writing import atomic_file

FILE_PATTERN = re.compile(r"logits_ep(\d+)_(\d+)\.h5$")
SHIFT_PROB = 0.5  # the reference's torch_audiomentations Shift(min_shift=-0.5, max_shift=0.5), p = 0.5
SHIFT_MAX_FRACTION = 0.5
TIME_MASK_MAX_FRAMES = 192  # TimeMasking(192), FrequencyMasking(24) of the published configs
FREQ_MASK_MAX_BINS = 24
AUDIOSET_TOOL = "data_prep.audioset"  # the manifest's `tool` of AudioSet shards
TIME_AXES = {"batch": OFFICIAL_BATCH, "chunk": OFFICIAL_CHUNK}  # `import_official`'s time_axis -> view_source


@dataclass(frozen=True)
class OfficialView:
    """One row's view: `shift_samples` circular shift of the chunk's own samples (0: none); masks as in
    `VIEW_PARAMS_DTYPE` (start and width on the front-end grid)."""

    shift_samples: int
    time_mask_start: int
    time_mask_frames: int
    freq_mask_start: int
    freq_mask_bins: int

    def params(self) -> np.ndarray:
        """The view as a `VIEW_PARAMS_DTYPE` record: no frame shift (the shift is in the waveform), no mixup."""
        record = np.zeros((), VIEW_PARAMS_DTYPE)
        record["time_mask_start"], record["time_mask_frames"] = self.time_mask_start, self.time_mask_frames
        record["freq_mask_start"], record["freq_mask_bins"] = self.freq_mask_start, self.freq_mask_bins
        record["partner_row"] = -1
        return record


def _mask(u1: torch.Tensor, u2: torch.Tensor, axis_cells: int, max_width: int) -> tuple[int, int]:
    """(start, width) of one mask from the shared uniforms, in float32 as the reference computes it."""
    width = u1 * max_width
    start = u2 * (axis_cells - width)
    return int(start.long()), int(width.long())


def official_view(seed: int, num_samples: int, time_frames: int) -> OfficialView:
    """The view the reference drew for a row of seed `seed` whose chunk holds `num_samples` samples, in a batch of
    `time_frames` frames (see the module docstring)."""
    generator = torch.Generator().manual_seed(int(seed))
    shift = 0
    if torch.bernoulli(torch.full((1,), SHIFT_PROB), generator=generator)[0]:
        bound = SHIFT_MAX_FRACTION * num_samples
        shift = int(torch.randint(round(-bound), round(bound) + 1, (1,), generator=generator, dtype=torch.int32)[0])
    u1, u2 = torch.rand(1, generator=generator), torch.rand(1, generator=generator)
    time_start, time_width = _mask(u1, u2, time_frames, TIME_MASK_MAX_FRAMES)
    freq_start, freq_width = _mask(u1, u2, N_MELS, FREQ_MASK_MAX_BINS)
    return OfficialView(shift, time_start, time_width, freq_start, freq_width)


@dataclass(frozen=True)
class OfficialPart:
    """One `logits_ep{view}_{rank}.h5` with its parquet: `filenames` (rows,) str, `starts_s`/`ends_s` (rows,)
    float32 seconds, `seeds` (rows,) int64, `topk_values` (rows, k) float16, `topk_indices` (rows, k) int16."""

    path: Path
    view: int
    rank: int
    filenames: list[str]
    starts_s: np.ndarray
    ends_s: np.ndarray
    seeds: np.ndarray
    topk_values: np.ndarray
    topk_indices: np.ndarray

    def __len__(self) -> int:
        return len(self.seeds)


def official_parts(logits_dir: str | Path) -> list[Path]:
    """The `logits_ep*_*.h5` files of `logits_dir`, ordered by view then rank."""
    logits_dir = Path(logits_dir)
    if not logits_dir.is_dir():
        raise StoreError(f"{logits_dir}: no such directory of the reference's logits_ep*_*.h5 files")
    parts = [(int(m[1]), int(m[2]), path) for path in logits_dir.iterdir() if (m := FILE_PATTERN.match(path.name))]
    if not parts:
        raise StoreError(f"{logits_dir}: holds no logits_ep<E>_<rank>.h5 file")
    return [path for _, _, path in sorted(parts)]


def _require_pyarrow() -> None:
    """The release's parquet files need pyarrow: the `official` extra (MissingExtra without it)."""
    require("official", "pyarrow", "pyarrow.parquet",
            feature="reading the paper's released outputs (their parquet files)")


def read_official_part(path: str | Path) -> OfficialPart:
    """Read one part (its HDF5 file and the parquet beside it); a missing or inconsistent file is a `StoreError`
    naming it, a missing `official` extra a MissingExtra."""
    _require_pyarrow()
    import pyarrow.parquet

    path = Path(path)
    match = FILE_PATTERN.match(path.name)
    if match is None:
        raise StoreError(f"{path}: not named logits_ep<E>_<rank>.h5")
    table_path = path.with_suffix(".parquet")
    if not table_path.is_file():
        raise StoreError(f"{path}: no {table_path.name} beside it (the clip names and chunk times of its rows)")
    try:
        with h5py.File(path, "r", locking=False) as file:
            missing = {"topk_values", "topk_indexes", "seeds"} - set(file)
            if missing:
                raise StoreError(f"{path}: lacks the dataset(s) {', '.join(sorted(missing))}")
            values, indices, seeds = file["topk_values"][...], file["topk_indexes"][...], file["seeds"][...]
        table = pyarrow.parquet.read_table(table_path, columns=["filename", "start", "end"]).to_pydict()
    except (OSError, KeyError, pyarrow.ArrowException) as error:
        raise StoreError(f"{path}: unreadable: {error}") from error
    rows = len(seeds)
    if values.shape != indices.shape or values.ndim != 2 or len(values) != rows or len(table["filename"]) != rows:
        raise StoreError(f"{path}: topk_values {values.shape}, topk_indexes {indices.shape}, seeds ({rows},) and "
                         f"{len(table['filename'])} parquet rows do not describe the same rows")
    return OfficialPart(path, int(match[1]), int(match[2]), [str(name) for name in table["filename"]],
                        np.asarray(table["start"], np.float32), np.asarray(table["end"], np.float32),
                        seeds.astype(np.int64), values.astype(np.float16), indices.astype(np.int16))


@dataclass
class ImportReport:
    """What `import_official` wrote and left out. `left_out`: `(kind, where, detail)` per release row that matches no
    shard chunk (`unmatched row`), per chunk the release holds in some views only (`incomplete row`) and per shard
    chunk without a row (`uncovered chunk`), also written to `accounting` (TSV)."""

    store: Path
    accounting: Path
    rows: int
    views: int
    chunks: int  # chunk rows of the shards (10 s chunks, `data.chunks`)
    release_rows: int  # rows of one view of the release
    left_out: list[tuple[str, str, str]]

    def counts(self) -> dict[str, int]:
        return report_counts(self.left_out)


def report_counts(left_out: list[tuple[str, str, str]]) -> dict[str, int]:
    """Left-out entries per kind."""
    return dict(Counter(kind for kind, _, _ in left_out))


@dataclass(frozen=True)
class _Sample:
    shard: int  # index in the manifest
    place: int  # in the shard's stored order
    key: str
    offset: int  # samples into its source file
    length: int  # samples


def _sample_index(manifest) -> dict[str, list[_Sample]]:
    """Shard samples by the names the reference may have given their file (it named clips by file name only): for
    AudioSet shards the YouTube id, which their keys `<YTID>_<start ms>` hold (no audio is read); else the recorded
    source file's base name and stem (read from the shards' JSON records)."""
    index: dict[str, list[_Sample]] = {}
    for shard_index, shard in enumerate(manifest.shards):
        if manifest.tool == AUDIOSET_TOOL:
            names = [[key.rsplit("_", 1)[0]] for key in shard.keys]
        else:
            names = [[Path(record["source_file"]).name, Path(record["source_file"]).stem]
                     for record in iter_records(shard.path)]
        for place, (key, sample_names) in enumerate(zip(shard.keys, names, strict=True)):
            sample = _Sample(shard_index, place, key, shard.offsets[place], shard.lengths[place])
            for name in sample_names:
                index.setdefault(name, []).append(sample)
    return index


def _release_names(filename: str) -> list[str]:
    """Names to look a release row's file up by: base name, stem, and the YouTube id an AudioSet-style name may
    start with (`<id>_<start>...`, or `Y<id>...`; an id may itself start with Y, so both)."""
    path = Path(filename)
    return [path.name, path.stem, path.stem[:11]] + ([path.stem[1:12]] if path.stem.startswith("Y") else [])


def _match(index: dict[str, list[_Sample]], filename: str, start: int, end: int,
           chunk_samples: int) -> tuple[_Sample, int] | str:
    """The shard sample and chunk of a release row of `filename` `[start, end)` samples, or why there is none."""
    candidates = list({sample: None for name in _release_names(filename) for sample in index.get(name, ())})
    if not candidates:
        return "no shard sample from a file of that name"
    inside = [s for s in candidates if s.offset <= start < s.offset + s.length]
    if len(inside) != 1:
        keys = ", ".join(s.key for s in candidates[:3])
        return (f"{len(inside)} shard samples of that name hold its start ({keys})" if inside
                else f"no shard sample of that name ({keys}) holds [{start}, {end}) samples")
    sample = inside[0]
    chunk, rest = divmod(start - sample.offset, chunk_samples)
    own = min(sample.length - chunk * chunk_samples, chunk_samples)
    if rest or end - start != own:
        return (f"[{start}, {end}) samples is not a chunk of shard sample {sample.key} "
                f"({sample.length} samples from {sample.offset})")
    return sample, chunk


def import_official(logits_dir: str | Path, shards_dir: str | Path, out: str | Path, time_axis: str = "batch",
                    progress: bool = True) -> ImportReport:
    """Write the released outputs in `logits_dir` as a store of `shards_dir`'s chunks at `out` (see the module
    docstring and docs/store.md), with the accounting of what was left out beside it. `time_axis`: "batch" (1001
    frames: the reference's batches of 128 on AudioSet) or "chunk" (each chunk's own frames: a release made at batch
    size 1) for the time-mask draws. Without the `official` extra it raises MissingExtra before reading anything."""
    if time_axis not in TIME_AXES:
        raise ValueError(f"time axis must be one of {sorted(TIME_AXES)}, got {time_axis!r}")
    _require_pyarrow()
    out, augment = Path(out), AugmentConfig(mixup_prob=0.0)  # the reference's chunk, shift and mask limits
    chunk_samples = augment.clip_samples
    manifest = read_manifest(shards_dir)
    paths = official_parts(logits_dir)
    paths_of_view: dict[int, list[Path]] = {}
    for path in paths:
        paths_of_view.setdefault(int(FILE_PATTERN.match(path.name)[1]), []).append(path)
    views = sorted(paths_of_view)
    layouts = [shard_chunks(shard, chunk_samples) for shard in manifest.shards]
    first_row = np.cumsum([0] + [len(layout) for layout in layouts]).tolist()  # flat chunk number of each shard
    flat_of = {(shard, layout.keys[row], int(layout.chunks[row])): first_row[shard] + row
               for shard, layout in enumerate(layouts) for row in range(len(layout))}
    index = _sample_index(manifest)

    # Pass 1: every release row's flat chunk number (-1: none), and in how many views each chunk appears.
    targets: dict[Path, np.ndarray] = {}
    seen = np.zeros((len(views), first_row[-1]), bool)
    left_out: list[tuple[str, str, str]] = []
    top_k, release_rows = None, 0
    for path in tqdm(paths, desc="match release rows", unit="file", disable=not progress):
        part = read_official_part(path)
        top_k = top_k or part.topk_values.shape[1]
        if part.topk_values.shape[1] != top_k:
            raise StoreError(f"{path}: top-{part.topk_values.shape[1]} outputs, the other files hold top-{top_k}")
        if len(part) and int(part.topk_indices.max()) >= manifest.num_classes:
            raise StoreError(f"{path}: class index {int(part.topk_indices.max())} outside the "
                             f"{manifest.num_classes} classes of {manifest.root}")
        view = views.index(part.view)
        release_rows += len(part) if view == 0 else 0
        flat = np.full(len(part), -1, np.int64)
        for row, (name, start_s, end_s) in enumerate(zip(part.filenames, part.starts_s, part.ends_s)):
            start, end = round(float(start_s) * SAMPLE_RATE), round(float(end_s) * SAMPLE_RATE)
            match = _match(index, name, start, end, chunk_samples)
            if isinstance(match, str):
                left_out.append(("unmatched row", f"{path.name}:{row}",
                                 f"{name} [{float(start_s):g}, {float(end_s):g}) s: {match}"))
                continue
            sample, chunk = match
            flat[row] = flat_of[(sample.shard, sample.key, chunk)]
            if seen[view, flat[row]]:
                raise StoreError(f"{path}:{row}: chunk {sample.key}#{chunk} appears twice in view {part.view}")
            seen[view, flat[row]] = True
        targets[path] = flat
    complete = seen.all(axis=0)
    for shard, layout in enumerate(layouts):
        for row in range(len(layout)):
            flat = first_row[shard] + row
            if not complete[flat]:
                where = f"{layout.keys[row]}#{int(layout.chunks[row])}"
                in_views = [views[v] for v in np.flatnonzero(seen[:, flat])]
                left_out.append(("incomplete row", where, f"only in views {in_views} of {views}") if in_views else
                                ("uncovered chunk", where, f"{manifest.shards[shard].name}: no row of the release"))

    # Pass 2, view by view: the covered chunks' outputs, seeds and re-derived views. Each part is read again rather
    # than kept from pass 1, so memory holds one view of the release (AS-2M: 10 views of 2 million rows).
    store_row = np.cumsum(complete) - 1  # flat chunk number -> store row (for covered chunks)
    rows = [(shard, row) for shard, layout in enumerate(layouts) for row in range(len(layout))
            if complete[first_row[shard] + row]]
    lengths = [min(manifest.shards[shard].lengths[layouts[shard].sample_rows[row]]
                   - int(layouts[shard].chunks[row]) * chunk_samples, chunk_samples) for shard, row in rows]
    frames = [1001 if time_axis == "batch" else num_frames(length) for length in lengths]
    offsets = np.cumsum([0] + [sum(complete[first_row[s] : first_row[s + 1]]) for s in range(len(layouts))])
    digest = hashlib.sha256()
    for path in paths:
        digest.update(f"{path.name} {file_sha256(path)} {file_sha256(path.with_suffix('.parquet'))}\n".encode())
    teacher = {"file": f"{Path(logits_dir).name} (released outputs)", "sha256": digest.hexdigest(),
               "bytes": sum(path.stat().st_size + path.with_suffix(".parquet").stat().st_size for path in paths)}
    # The release does not record the dtype its teachers ran in: the store's precision stays unrecorded (None).
    spec = StoreSpec(manifest.fingerprint, augment, 0, (teacher,), "probs", top_k, len(views), manifest.num_classes,
                     TIME_AXES[time_axis], precision=None)
    out.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(views) * len(rows), desc="re-derive views", unit="row", disable=not progress)
    with atomic_file(out) as tmp, h5py.File(tmp, "w") as file:
        create_layout(file, spec, [layouts[shard].keys[row] for shard, row in rows],
                      np.array([layouts[shard].chunks[row] for shard, row in rows], np.int32),
                      [shard.name for shard in manifest.shards], offsets.tolist())
        for v, view in enumerate(views):
            values, indices = np.zeros((len(rows), top_k), np.float16), np.zeros((len(rows), top_k), np.int16)
            seeds = np.zeros(len(rows), np.int64)
            for path in paths_of_view[view]:
                part, flat = read_official_part(path), targets[path]
                keep = flat >= 0
                keep[keep] = complete[flat[keep]]
                at = store_row[flat[keep]]
                values[at], indices[at], seeds[at] = part.topk_values[keep], part.topk_indices[keep], part.seeds[keep]
            params, shifts = np.zeros(len(rows), VIEW_PARAMS_DTYPE), np.zeros(len(rows), np.int32)
            for i, (seed, length, axis) in enumerate(zip(seeds.tolist(), lengths, frames)):
                drawn = official_view(seed, length, axis)
                params[i], shifts[i] = drawn.params(), drawn.shift_samples
                bar.update()
            file["topk_values"][v], file["topk_indices"][v] = values, indices
            file["view_params"][v], file["shift_samples"][v], file["seeds"][v] = params, shifts, seeds
        file.attrs["left_out"] = json.dumps(report_counts(left_out), sort_keys=True)  # what the TSV lists
    bar.close()
    accounting = out.with_name(f"{out.stem}.left_out.tsv")
    with open(accounting, "w", encoding="utf-8") as handle:
        handle.write("kind\twhere\tdetail\n")
        handle.writelines(f"{kind}\t{where}\t{detail}\n" for kind, where, detail in left_out)
    return ImportReport(out, accounting, len(rows), len(views), first_row[-1], release_rows, left_out)
