"""Tagging metrics as AudioSet papers report them: mAP, mAUC and d-prime, plus a per-class AP table.

mAP is the macro average of scikit-learn's average precision over the classes that have at least one positive clip
in the evaluated set (a class without positives has no defined AP). mAUC averages ROC AUC over the classes that have
both positives and negatives; d-prime is derived from mAUC as in the AudioSet baseline papers:
`d' = sqrt(2) * Phi^-1(mAUC)`.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score


@dataclass(frozen=True)
class TaggingMetrics:
    """Scores of one system on one labelled set.

    `ap` and `auc` hold one value per class, NaN where the metric is undefined for that class;
    `positives` counts the positive clips of each class.
    """

    mAP: float
    mAUC: float
    d_prime: float
    num_clips: int
    num_classes_scored: int
    ap: np.ndarray
    auc: np.ndarray
    positives: np.ndarray

    def summary(self) -> dict[str, float | int]:
        """The scalar metrics, JSON-ready."""
        return {
            "mAP": self.mAP,
            "mAUC": self.mAUC,
            "d_prime": self.d_prime,
            "num_clips": self.num_clips,
            "num_classes_scored": self.num_classes_scored,
        }


def d_prime(auc: float) -> float:
    """Sensitivity index of a ROC AUC: `sqrt(2) * Phi^-1(auc)` (infinite at 0 and 1, NaN for NaN)."""
    if math.isnan(auc):
        return math.nan
    if auc <= 0.0 or auc >= 1.0:
        return math.copysign(math.inf, auc - 0.5)
    return math.sqrt(2.0) * NormalDist().inv_cdf(auc)


def tagging_metrics(targets: np.ndarray, scores: np.ndarray) -> TaggingMetrics:
    """mAP, mAUC and d-prime of `scores` against multi-hot `targets`.

    Args:
        targets: `(clips, classes)` 0/1 labels (any dtype; nonzero means positive).
        scores: `(clips, classes)` probabilities or logits (any monotonic score per class gives the same metrics).

    Raises:
        ValueError: when the shapes differ, or no class has a positive clip.
    """
    targets = np.asarray(targets) > 0
    scores = np.asarray(scores, dtype=np.float64)
    if targets.shape != scores.shape or targets.ndim != 2:
        raise ValueError(f"expected targets and scores of one (clips, classes) shape, found {targets.shape} and "
                         f"{scores.shape}")
    positives = targets.sum(axis=0)
    negatives = targets.shape[0] - positives
    ap = np.full(targets.shape[1], np.nan)
    auc = np.full(targets.shape[1], np.nan)
    for index in np.flatnonzero(positives > 0):
        ap[index] = average_precision_score(targets[:, index], scores[:, index])
        if negatives[index] > 0:
            auc[index] = roc_auc_score(targets[:, index], scores[:, index])
    scored = int((positives > 0).sum())
    if scored == 0:
        raise ValueError(f"no class has a positive clip among {targets.shape[0]} clips: mAP is undefined")
    mean_auc = float(np.nanmean(auc)) if np.isfinite(auc).any() else math.nan
    return TaggingMetrics(
        mAP=float(np.nanmean(ap)),
        mAUC=mean_auc,
        d_prime=d_prime(mean_auc),
        num_clips=int(targets.shape[0]),
        num_classes_scored=scored,
        ap=ap,
        auc=auc,
        positives=positives.astype(np.int64),
    )


def write_per_class_csv(path: str | Path, metrics: TaggingMetrics, names: Sequence[str]) -> Path:
    """Write `index,display_name,positives,ap,auc` for every class, best AP first (unscored classes last, empty)."""
    if len(names) != len(metrics.ap):
        raise ValueError(f"{len(names)} class names for {len(metrics.ap)} scored classes")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    order = sorted(range(len(names)), key=lambda i: (math.isnan(metrics.ap[i]), -np.nan_to_num(metrics.ap[i])))
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["index", "display_name", "positives", "ap", "auc"])
        for index in order:
            writer.writerow([
                index,
                names[index],
                int(metrics.positives[index]),
                "" if math.isnan(metrics.ap[index]) else f"{metrics.ap[index]:.6f}",
                "" if math.isnan(metrics.auc[index]) else f"{metrics.auc[index]:.6f}",
            ])
    return path
