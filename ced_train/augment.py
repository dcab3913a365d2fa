"""Augmentation as data: per-(clip, view) parameters are sampled here, stored by the teacher pass, read back by
distillation, and applied by `apply`, the one implementation used on both sides.

A view of a clip is rendered on the CED front-end grid (10 ms frames, 64 mel bins) of a fixed 10 s chunk, in dB,
before the model's mel BatchNorm, in this order:

0. only in views re-derived from the reference's released outputs (`store.official`): a circular shift of the
   chunk's own waveform samples before it is padded (`shift_chunk`), in the loader;
1. circular time shift of the clip's log-mel by `shift_frames` (applied with probability `shift_prob`);
2. mixup with a partner clip of the same shard: `(1 - w) * own + w * partner`, where `partner` is the partner's
   un-augmented log-mel and `w = partner_weight_q / 255` (the weight is quantised before it is applied, so the stored
   byte is exactly the weight that was used);
3. one time mask `[time_mask_start, time_mask_start + time_mask_frames)` and one frequency mask
   `[freq_mask_start, freq_mask_start + freq_mask_bins)`, filled with `mask_fill_db` (0 dB as in the reference).

Parameters come from a counter-based generator keyed by (seed, clip key, view) — blake2b of the three into a Philox
key — so they depend neither on worker count, batch size, device nor order. Mixup partners are drawn within a block of
`mixup_block_clips` consecutive clips of the shard's stored order, so a reader only ever holds one block in memory.
See docs/store.md for the rationale of each choice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

import numpy as np
import torch

from ced_train.audio import SAMPLE_RATE
from ced_train.models.frontend import HOP_SAMPLES, N_MELS, num_frames

WEIGHT_LEVELS = 255  # partner weights are stored as one byte: w = q / 255

# One record per (clip, view): 13 bytes, packed (no alignment padding), in the store and in memory.
VIEW_PARAMS_DTYPE = np.dtype(
    [
        ("shift_frames", "<i2"),  # circular shift of the frame axis; positive moves content later
        ("time_mask_start", "<i2"),  # first masked frame
        ("time_mask_frames", "<i2"),  # masked frames (0: no time mask)
        ("freq_mask_start", "u1"),  # first masked mel bin
        ("freq_mask_bins", "u1"),  # masked mel bins (0: no frequency mask)
        ("partner_row", "<i4"),  # partner's row in the shard's stored order; -1: no mixup
        ("partner_weight_q", "u1"),  # partner weight w = q / 255; 0 when partner_row is -1
    ]
)


@dataclass(frozen=True)
class AugmentConfig:
    """What the augmentation of a view may do; recorded (as JSON) in every teacher store.

    Args:
        clip_samples: fixed input length in samples at 16 kHz; shorter clips are zero-padded at the end, longer ones
            keep their first `clip_samples` (10 s → 1001 frames).
        shift_prob: probability of a circular time shift.
        shift_max_fraction: largest shift as a fraction of the chunk's frames (0.5: up to ±500 of 1001 frames).
        time_mask_max_frames: largest time-mask width in frames (width uniform in [0, max]); 0 disables.
        freq_mask_max_bins: largest frequency-mask width in mel bins (uniform in [0, max]); 0 disables.
        mask_fill_db: value written into masked cells, in dB.
        mixup_prob: probability that a view is mixed with a partner; 0 disables mixup.
        mixup_alpha: the partner weight is drawn from Beta(alpha, alpha).
        mixup_block_clips: partners are drawn within blocks of this many consecutive clips of a shard.
    """

    clip_samples: int = 10 * SAMPLE_RATE
    shift_prob: float = 0.5
    shift_max_fraction: float = 0.5
    time_mask_max_frames: int = 192
    freq_mask_max_bins: int = 24
    mask_fill_db: float = 0.0
    mixup_prob: float = 0.5
    mixup_alpha: float = 0.5
    mixup_block_clips: int = 128

    def __post_init__(self) -> None:
        problems = []
        if self.clip_samples < HOP_SAMPLES:
            problems.append(f"clip_samples={self.clip_samples} must be at least {HOP_SAMPLES}")
        for name in ("shift_prob", "shift_max_fraction", "mixup_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name}={getattr(self, name)} must lie in [0, 1]")
        if not 0 <= self.time_mask_max_frames <= min(self.frames, np.iinfo(np.int16).max):
            problems.append(f"time_mask_max_frames={self.time_mask_max_frames} must lie in [0, {self.frames}]")
        if not 0 <= self.freq_mask_max_bins <= N_MELS:
            problems.append(f"freq_mask_max_bins={self.freq_mask_max_bins} must lie in [0, {N_MELS}]")
        if self.mixup_prob > 0 and self.mixup_alpha <= 0:
            problems.append(f"mixup_alpha={self.mixup_alpha} must be positive when mixup_prob > 0")
        if not 1 <= self.mixup_block_clips <= np.iinfo(np.int16).max:
            problems.append(f"mixup_block_clips={self.mixup_block_clips} must lie in [1, 32767]")
        if problems:
            raise ValueError("augment config: " + "; ".join(problems))

    @property
    def frames(self) -> int:
        """Frames of the front-end grid for one chunk (1001 for 10 s)."""
        return num_frames(self.clip_samples)

    @property
    def max_shift_frames(self) -> int:
        return int(self.frames * self.shift_max_fraction)

    def to_json(self) -> str:
        """Canonical JSON (sorted keys): equal configs give equal strings."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "AugmentConfig":
        return cls(**json.loads(text))

    def differences(self, other: "AugmentConfig") -> list[str]:
        """`name: self_value != other_value` for every field that differs."""
        mine, theirs = dataclasses.asdict(self), dataclasses.asdict(other)
        return [f"{name}: {mine[name]!r} != {theirs[name]!r}" for name in mine if mine[name] != theirs[name]]


TEACH = "teach"  # the purpose of the teacher pass's views, which the store holds


def view_generator(seed: int, key: str, view: int, purpose: str = TEACH) -> np.random.Generator:
    """The counter-based generator of one (purpose, seed, clip key, view): Philox keyed by blake2b of the four.

    Each purpose is its own stream: views drawn for supervised training never equal the teacher pass's views, even
    with equal seeds. The teacher pass's key leaves its purpose out (stores made before purposes stay checkable).
    """
    name = f"{seed}\x1f{key}\x1f{view}" if purpose == TEACH else f"{purpose}\x1f{seed}\x1f{key}\x1f{view}"
    digest = hashlib.blake2b(name.encode(), digest_size=16, person=b"ced-augment-v1").digest()
    return np.random.Generator(np.random.Philox(key=np.frombuffer(digest, dtype="<u8")))


def block_bounds(row: int, shard_clips: int, block_clips: int) -> tuple[int, int]:
    """`[start, stop)` rows of the mixup block that holds `row` in a shard of `shard_clips` clips."""
    if not 0 <= row < shard_clips:
        raise IndexError(f"row {row} outside a shard of {shard_clips} clips")
    start = row - row % block_clips
    return start, min(start + block_clips, shard_clips)


def sample_view(
    config: AugmentConfig, seed: int, key: str, view: int, row: int, shard_clips: int, purpose: str = TEACH
) -> np.void:
    """Parameters of one (clip, view) as a `VIEW_PARAMS_DTYPE` record.

    Args:
        key: the clip's key (unique within the dataset).
        view: view index (the teacher pass's views are 0..V-1; fresh student augmentation may use the epoch).
        row: the clip's row in its shard's stored order; `shard_clips` the shard's clip count. Both define the
            mixup block the partner is drawn from.

        purpose: the stream of draws (`view_generator`).

    Every draw is always made, in a fixed order, so switching one augmentation off leaves the others unchanged.
    """
    rng = view_generator(seed, key, view, purpose)
    frames = config.frames
    record = np.zeros((), dtype=VIEW_PARAMS_DTYPE)

    shift_on = rng.random() < config.shift_prob
    shift = int(rng.integers(-config.max_shift_frames, config.max_shift_frames + 1))
    record["shift_frames"] = shift if shift_on else 0

    time_width = int(rng.integers(0, config.time_mask_max_frames + 1))
    record["time_mask_frames"] = time_width
    record["time_mask_start"] = int(rng.integers(0, frames - time_width + 1))
    freq_width = int(rng.integers(0, config.freq_mask_max_bins + 1))
    record["freq_mask_bins"] = freq_width
    record["freq_mask_start"] = int(rng.integers(0, N_MELS - freq_width + 1))

    mix_on = rng.random() < config.mixup_prob
    weight = rng.beta(config.mixup_alpha, config.mixup_alpha) if config.mixup_alpha > 0 else 0.0
    start, stop = block_bounds(row, shard_clips, config.mixup_block_clips)
    offset = int(rng.integers(1, stop - start)) if stop - start > 1 else 0
    weight_q = int(round(weight * WEIGHT_LEVELS))
    if mix_on and offset and weight_q:
        record["partner_row"] = start + (row - start + offset) % (stop - start)
        record["partner_weight_q"] = weight_q
    else:
        record["partner_row"] = -1
    return record[()]


def sample_views(
    config: AugmentConfig, seed: int, keys: list[str], views: list[int], rows: list[int], shard_clips: int,
    purpose: str = TEACH,
) -> np.ndarray:
    """`sample_view` for parallel lists of keys, views and rows of one shard → `(n,) VIEW_PARAMS_DTYPE`."""
    params = np.empty(len(keys), dtype=VIEW_PARAMS_DTYPE)
    for i, (key, view, row) in enumerate(zip(keys, views, rows, strict=True)):
        params[i] = sample_view(config, seed, key, view, row, shard_clips, purpose)
    return params


def check_params(params: np.ndarray, frames: int, shard_clips: int | None = None) -> None:
    """Raise ValueError if any record would index outside a `(64, frames)` grid (or outside the shard)."""
    problems = []
    if np.any(np.abs(params["shift_frames"].astype(np.int64)) >= frames):
        problems.append("shift_frames beyond the frame count")
    time_stop = params["time_mask_start"].astype(np.int64) + params["time_mask_frames"]
    if np.any(params["time_mask_start"] < 0) or np.any(params["time_mask_frames"] < 0) or np.any(time_stop > frames):
        problems.append(f"time mask outside [0, {frames})")
    if np.any(params["freq_mask_start"].astype(np.int64) + params["freq_mask_bins"] > N_MELS):
        problems.append(f"frequency mask outside [0, {N_MELS})")
    no_partner = params["partner_row"] < 0
    if np.any(params["partner_weight_q"][no_partner] != 0) or np.any(params["partner_row"] < -1):
        problems.append("a partner weight without a partner")
    if shard_clips is not None and np.any(params["partner_row"] >= shard_clips):
        problems.append(f"partner_row beyond the shard's {shard_clips} clips")
    if problems:
        raise ValueError("view parameters out of bounds: " + "; ".join(problems))


def shift_chunk(chunk: np.ndarray, shift_samples: int) -> np.ndarray:
    """A view's waveform step: `(samples,)` `chunk`, its own samples before padding, rolled circularly by
    `shift_samples` (positive moves content later), as the reference's waveform shift did. Views drawn here leave it
    at 0 and shift frames instead."""
    return np.roll(chunk, shift_samples) if shift_samples else chunk


def fixed_length(waveform: np.ndarray, clip_samples: int) -> np.ndarray:
    """`(samples,)` float32 or int16 → `(clip_samples,)` of the same dtype: zero-padded at the end, or the first
    `clip_samples`."""
    waveform = np.asarray(waveform)
    if waveform.ndim != 1:
        raise ValueError(f"expected a mono waveform of shape (samples,), got {waveform.shape}")
    if waveform.shape[0] >= clip_samples:
        return waveform[:clip_samples]
    return np.pad(waveform, (0, clip_samples - waveform.shape[0]))


def partner_weights(weight_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(batch,)` integer `partner_weight_q` → float32 `(own, partner)` weights `((255 - q) / 255, q / 255)`."""
    weight_q = weight_q.float()
    return (WEIGHT_LEVELS - weight_q) / WEIGHT_LEVELS, weight_q / WEIGHT_LEVELS


def apply(
    mel_db: torch.Tensor, params: dict[str, torch.Tensor], partner_mel_db: torch.Tensor, fill_db: float = 0.0
) -> torch.Tensor:
    """Render views: the one implementation of the augmentation, used by the teacher pass and the student, on any
    device.

    Args:
        mel_db: `(batch, 64, frames)` float32 log-mel in dB of each clip's fixed-length chunk (un-augmented).
        params: `params_to_columns` of `(batch,)` `VIEW_PARAMS_DTYPE` records: one `(batch,)` integer tensor per
            field, on `mel_db`'s device, within bounds (`check_params`, which the loader runs: this function makes
            no host round trip).
        partner_mel_db: `(batch, 64, frames)` un-augmented log-mel of each row's partner; rows without a partner
            are ignored (may hold anything, e.g. their own clip).
        fill_db: value of masked cells (the config's `mask_fill_db`).

    Returns:
        `(batch, 64, frames)` float32 augmented log-mel in dB. Every operation is a gather, an element-wise product
        or sum (two products and a sum, each rounded once: no fused multiply-add) or a select, so each row depends
        only on its own inputs, neither on batch size nor batch-mates, and equals the row rendered alone bit for bit.
    """
    if mel_db.ndim != 3 or mel_db.shape[1] != N_MELS:
        raise ValueError(f"expected mel_db of shape (batch, {N_MELS}, frames), got {tuple(mel_db.shape)}")
    if partner_mel_db.shape != mel_db.shape:
        raise ValueError(f"partner_mel_db of shape {tuple(partner_mel_db.shape)} != mel_db's {tuple(mel_db.shape)}")
    batch, bins, frames = mel_db.shape
    if any(column.shape != (batch,) for column in params.values()):
        raise ValueError(f"expected {batch} parameter records, got columns of shapes "
                         f"{sorted({tuple(column.shape) for column in params.values()})}")
    frame = torch.arange(frames, device=mel_db.device)
    source = (frame[None, :] - params["shift_frames"][:, None]) % frames  # circular shift as a gather
    out = mel_db.float().gather(-1, source[:, None, :].expand(batch, bins, frames))
    own_weight, partner_weight = partner_weights(params["partner_weight_q"])
    mixed = out * own_weight[:, None, None] + partner_mel_db.float() * partner_weight[:, None, None]
    out = torch.where((params["partner_row"] >= 0)[:, None, None], mixed, out)
    bin_ = torch.arange(bins, device=mel_db.device)
    time_start, freq_start = params["time_mask_start"][:, None], params["freq_mask_start"][:, None]
    time_mask = (frame >= time_start) & (frame < time_start + params["time_mask_frames"][:, None])
    freq_mask = (bin_ >= freq_start) & (bin_ < freq_start + params["freq_mask_bins"][:, None])
    return out.masked_fill(time_mask[:, None, :] | freq_mask[:, :, None], fill_db)


def mix_labels(labels: torch.Tensor, partner_labels: torch.Tensor, params: np.ndarray) -> torch.Tensor:
    """Supervised targets of mixed views: `(batch, classes)` multi-hot labels mixed with the same weights as
    the inputs (rows without a partner keep their own labels)."""
    own_weight, partner_weight = partner_weights(torch.from_numpy(params["partner_weight_q"]))
    partner_weight = torch.where(torch.from_numpy(params["partner_row"] >= 0), partner_weight, 0.0)
    own_weight = torch.where(partner_weight > 0, own_weight, 1.0)
    return labels.float() * own_weight[:, None] + partner_labels.float() * partner_weight[:, None]


def params_to_columns(params: np.ndarray) -> dict[str, torch.Tensor]:
    """`(n,)` records → one int64 tensor per field: the form that crosses DataLoader workers and collates."""
    return {name: torch.from_numpy(params[name].astype(np.int64)) for name in VIEW_PARAMS_DTYPE.names}


def params_from_columns(columns: dict) -> np.ndarray:
    """Inverse of `params_to_columns` (also accepts collated per-item columns): → `(n,)` `VIEW_PARAMS_DTYPE`."""
    first = np.asarray(columns[VIEW_PARAMS_DTYPE.names[0]])
    params = np.empty(first.shape, dtype=VIEW_PARAMS_DTYPE)
    for name in VIEW_PARAMS_DTYPE.names:
        values = np.asarray(columns[name])
        if np.any(values.astype(np.int64) != values.astype(params.dtype[name]).astype(np.int64)):
            raise ValueError(f"view parameter {name} does not fit {params.dtype[name]}")
        params[name] = values
    return params


VIEW_MODES = ("replay", "fresh", "reference")  # the values of distill.views


@dataclass(frozen=True)
class ViewSampler:
    """Fresh parameters from `config`, keyed by (`purpose`, `seed`, clip key, view): the teacher pass uses one to
    make the stored views; distillation without consistency one with another seed; supervised training one of
    purpose `"train"`.

    With `reference`, the views of the reference's ablation `disable_consistency` (RicherMans/CED): no time shift,
    fresh masks, and the mixup partner and weight of the stored view, which that switch leaves as configured."""

    config: AugmentConfig
    seed: int
    purpose: str = TEACH
    reference: bool = False

    def sample(
        self, keys: list[str], views: list[int], rows: list[int], shard_clips: int, stored: np.ndarray | None = None
    ) -> np.ndarray:
        """`(n,) VIEW_PARAMS_DTYPE` of the clips' views; `stored`: the store's `(n,)` records of the same clips and
        rows (needed with `reference`)."""
        params = sample_views(self.config, self.seed, keys, views, rows, shard_clips, self.purpose)
        if self.reference:
            if stored is None or stored.shape != params.shape:
                raise ValueError(f"reference views keep the stored mixup: expected {len(params)} stored records, "
                                 f"got {None if stored is None else len(stored)}")
            params["shift_frames"] = 0
            params["partner_row"] = stored["partner_row"]
            params["partner_weight_q"] = stored["partner_weight_q"]
        return params


def distill_sampler(views: str, config: AugmentConfig, seed: int) -> ViewSampler | None:
    """The sampler of distillation's views (`distill.views`) on a store made with `config`.

    "replay": None, the stored views. "fresh": shift, masks and mixup drawn anew (stream "fresh", `seed`).
    "reference": the masks of "fresh" (the same draws), no shift, the stored mixup.
    """
    if views not in VIEW_MODES:
        raise ValueError(f"distill.views={views!r}: expected one of {', '.join(VIEW_MODES)}")
    if views == "replay":
        return None
    return ViewSampler(config, seed, purpose="fresh", reference=views == "reference")
