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

import re
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from ced_train.augment import VIEW_PARAMS_DTYPE
from ced_train.models.frontend import N_MELS
from ced_train.store.format import StoreError

FILE_PATTERN = re.compile(r"logits_ep(\d+)_(\d+)\.h5$")
SHIFT_PROB = 0.5  # the reference's torch_audiomentations Shift(min_shift=-0.5, max_shift=0.5), p = 0.5
SHIFT_MAX_FRACTION = 0.5
TIME_MASK_MAX_FRAMES = 192  # TimeMasking(192), FrequencyMasking(24) of the published configs
FREQ_MASK_MAX_BINS = 24


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


def read_official_part(path: str | Path) -> OfficialPart:
    """Read one part (its HDF5 file and the parquet beside it); a missing or inconsistent file is a `StoreError`
    naming it."""
    try:
        import pyarrow.parquet
    except ImportError as error:
        raise StoreError("reading the reference's parquet files needs pyarrow: pip install 'ced-train[official]'") \
            from error
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
