"""The linear-probe baseline of every evaluate table: one-vs-rest logistic regression on per-bin log-mel statistics.

Features of a clip: for each of the 64 bins of the model's log-mel front end, the mean, standard deviation and
maximum over the frames of the clip's true length (dB) → 192 values, standardised on the training clips. The maximum
keeps short events that the mean of a 10 s clip dilutes. A class without positive (or without negative) training
clips has nothing to fit and scores its training rate, a constant (0 for a class never seen).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader
from tqdm import tqdm

from ced_train.data import ClipStream, collate_clips
from ced_train.data.manifest import Manifest
from ced_train.models.frontend import LogMelFrontEnd, num_frames

FEATURES = "mean, std and max over time of each log-mel bin (dB), standardised"
# Inverse L2 strength on standardised features: shrinks enough for a few hundred clips against 192 features
# (the demo) and is light for AS-20K's 20k, so one value serves both without a validation split to tune it on.
C = 0.1


def clip_features(frontend: LogMelFrontEnd, waveform: torch.Tensor, lengths: torch.Tensor) -> np.ndarray:
    """`(batch, samples)` float32 16 kHz zero-padded waveforms and their `(batch,)` true lengths in samples →
    `(batch, 3 * n_mels)` float64: per mel bin the mean, then the std, then the max over the frames of the clip's
    true length (frames of padding are left out; a shorter clip's last frames see zeros instead of a reflection)."""
    mel_db = frontend(waveform)
    frames = torch.tensor([num_frames(n) for n in lengths.tolist()], device=mel_db.device)
    inside = (torch.arange(mel_db.shape[-1], device=mel_db.device) < frames[:, None])[:, None, :]
    count = frames[:, None].to(mel_db.dtype)
    mean = (mel_db * inside).sum(dim=-1) / count
    std = (((mel_db - mean[..., None]) ** 2 * inside).sum(dim=-1) / count).sqrt()
    peak = mel_db.masked_fill(~inside, -torch.inf).amax(dim=-1)
    return torch.cat([mean, std, peak], dim=1).double().cpu().numpy()


def shard_features(manifest: Manifest, frontend: LogMelFrontEnd, batch_size: int, num_workers: int,
                   max_clips: int | None, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """The first `max_clips` clips of `manifest` (all when None; shards hold their clips in seeded random order) →
    `(features (clips, 3 * n_mels) float64, targets (clips, classes) float32 multi-hot)`, with a progress bar."""
    clips = manifest.num_samples if max_clips is None else min(max_clips, manifest.num_samples)
    loader = DataLoader(ClipStream(manifest), batch_size=batch_size,
                        collate_fn=partial(collate_clips, num_classes=manifest.num_classes),
                        num_workers=min(num_workers, len(manifest.shards)))
    features, targets, done = [], [], 0
    with torch.inference_mode(), tqdm(total=clips, desc="baseline features", unit="clip", dynamic_ncols=True) as bar:
        for batch in loader:
            take = min(len(batch), clips - done)
            features.append(clip_features(frontend, batch.waveform[:take].to(device), batch.lengths[:take]))
            targets.append(batch.labels[:take].numpy())
            done += take
            bar.update(take)
            if done == clips:
                break
    return np.concatenate(features), np.concatenate(targets)


@dataclass(frozen=True)
class LinearProbe:
    """Fitted probe: `coef (classes, features)`, `intercept (classes,)` in standardised feature space; `fitted
    (classes,)` bool; `prior (classes,)` the constant score of classes that were not fitted."""

    scaler: StandardScaler
    coef: np.ndarray
    intercept: np.ndarray
    fitted: np.ndarray
    prior: np.ndarray

    def predict(self, features: np.ndarray) -> np.ndarray:
        """`(clips, features)` → `(clips, classes)` float64 probabilities."""
        logits = self.scaler.transform(features) @ self.coef.T + self.intercept
        probs = np.exp(-np.logaddexp(0.0, -logits))  # the sigmoid, without overflow
        return np.where(self.fitted, probs, self.prior)


def fit_probe(features: np.ndarray, targets: np.ndarray, c: float = C) -> LinearProbe:
    """One L2 logistic regression per class with both positive and negative clips among `targets` `(clips,
    classes)`, on standardised `features` `(clips, features)`."""
    scaler = StandardScaler().fit(features)
    x = scaler.transform(features)
    positives = targets > 0
    prior = positives.mean(axis=0)
    fitted = (prior > 0) & (prior < 1)
    coef = np.zeros((targets.shape[1], x.shape[1]))
    intercept = np.zeros(targets.shape[1])
    for index in tqdm(np.flatnonzero(fitted), desc="baseline fit", unit="class", dynamic_ncols=True):
        model = LogisticRegression(C=c, max_iter=1000).fit(x, positives[:, index])
        coef[index], intercept[index] = model.coef_[0], model.intercept_[0]
    return LinearProbe(scaler, coef, intercept, fitted, prior)
