"""Sound event detection scores with sed_eval 0.2.1's definitions: event-based and segment-based P/R/F1.

Written anew (sed_eval needs dcase_util, which needs `pkg_resources`, gone from setuptools >= 81) and checked against
sed_eval's own numbers in tests/fixtures/sed_reference.json. Definitions, after Mesaros et al., "Metrics for
polyphonic sound event detection" (2016), as sed_eval 0.2.1 computes them:

- Inputs map a filename to its events `(onset_s, offset_s, label)`; files are scored one at a time and the counts
  summed over files (micro average). A file listed on one side only has no events on the other. Only the `labels`
  given are scored: events of other labels are left out on both sides, as in sed_eval's class-wise scores (its
  event-based overall counts would include them, its segment-based scores refuse them).
- Event-based: a prediction fits a truth event of the same label when |onset difference| <= `t_collar` and
  |offset difference| <= max(`t_collar`, `percentage_of_length` × the truth event's length) (either condition can be
  switched off). Per file and label, true positives are the size of a maximum one-to-one matching of fitting pairs:
  sed_eval's default 'optimal' matching (Hopcroft-Karp), not its 'greedy' one, which can pair fewer. fp = predicted −
  tp, fn = truth − tp. sed_eval's overall error rate also counts substitutions (a second, label-blind pass over
  what is left); that pass, and so the event-based error rate, is not computed here.
- Segment-based: each file is cut into `time_resolution` segments up to the largest offset on either side; an event
  marks segments floor(onset / r) to ceil(offset / r) − 1 active for its label. Counts are over (segment, label)
  cells; the error rate sums, per segment, substitutions min(N_truth, N_pred) − tp, deletions max(0, N_truth −
  N_pred) and insertions max(0, N_pred − N_truth), divided by the active truth cells.
- precision = tp / (tp + fp), NaN when nothing is predicted; recall = tp / (tp + fn), NaN without truth events;
  F1 = 0 when both are 0, else their harmonic mean (NaN if either is NaN). The class-wise average F1 is the mean over
  classes with a defined F1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

EventLists = dict[str, list[tuple[float, float, str]]]


@dataclass(frozen=True)
class Counts:
    """True positives, false positives and false negatives of one class, or summed over classes."""

    tp: int
    fp: int
    fn: int

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else math.nan

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else math.nan

    @property
    def f1(self) -> float:
        precision, recall = self.precision, self.recall
        if precision == 0 and recall == 0:
            return 0.0
        return 2 * precision * recall / (precision + recall)


@dataclass(frozen=True)
class SedScores:
    """Scores of predicted events against truth.

    `class_wise` maps every evaluated label to its counts; `overall` sums them (micro average). `error_rate`: the
    segment-based error rate (NaN without truth), None for event-based scores.
    """

    overall: Counts
    class_wise: dict[str, Counts]
    error_rate: float | None = None

    @property
    def class_average_f1(self) -> float:
        """Mean F1 over the classes where it is defined (sed_eval's class-wise average); NaN if none is."""
        defined = [c.f1 for c in self.class_wise.values() if not math.isnan(c.f1)]
        return sum(defined) / len(defined) if defined else math.nan


def event_based(truth: EventLists, predicted: EventLists, labels: list[str], t_collar: float = 0.2,
                percentage_of_length: float = 0.2, evaluate_onset: bool = True,
                evaluate_offset: bool = True) -> SedScores:
    """Event-based scores (see the module docstring). `t_collar` in seconds (> 0); `percentage_of_length` in [0, 1]
    (0.2 as DCASE task 4 uses it; sed_eval's own default is 0.5)."""
    if t_collar <= 0 or not 0 <= percentage_of_length <= 1:
        raise ValueError(f"event_based: t_collar must be > 0 and percentage_of_length in [0, 1], got {t_collar} and "
                         f"{percentage_of_length}")
    if not (evaluate_onset or evaluate_offset):
        raise ValueError("event_based: evaluate_onset and evaluate_offset cannot both be False")
    tp, n_truth, n_predicted = (np.zeros(len(labels), dtype=np.int64) for _ in range(3))
    for filename in sorted(set(truth) | set(predicted)):
        truth_by_label = _by_label(truth.get(filename, []), labels, filename)
        predicted_by_label = _by_label(predicted.get(filename, []), labels, filename)
        for index in range(len(labels)):
            ref, est = truth_by_label[index], predicted_by_label[index]
            n_truth[index] += len(ref)
            n_predicted[index] += len(est)
            if not (len(ref) and len(est)):
                continue
            fits = np.ones((len(ref), len(est)), dtype=bool)
            if evaluate_onset:
                fits &= np.abs(ref[:, :1] - est[:, 0]) <= t_collar
            if evaluate_offset:
                tolerance_s = np.maximum(t_collar, percentage_of_length * (ref[:, 1:] - ref[:, :1]))
                fits &= np.abs(ref[:, 1:] - est[:, 1]) <= tolerance_s
            tp[index] += _max_matching(fits)
    return _scores(labels, tp, n_predicted - tp, n_truth - tp)


def segment_based(truth: EventLists, predicted: EventLists, labels: list[str],
                  time_resolution: float = 1.0) -> SedScores:
    """Segment-based scores over `time_resolution`-second segments (see the module docstring)."""
    if time_resolution <= 0:
        raise ValueError(f"segment_based: time_resolution must be > 0 seconds, got {time_resolution}")
    tp, fp, fn = (np.zeros(len(labels), dtype=np.int64) for _ in range(3))
    errors = active_truth = 0
    for filename in sorted(set(truth) | set(predicted)):
        rolls = []
        events = (truth.get(filename, []), predicted.get(filename, []))
        length_s = max((offset for side in events for _, offset, _ in side), default=0.0)
        for side in events:
            roll = np.zeros((math.ceil(length_s / time_resolution), len(labels)), dtype=bool)
            for index, times in enumerate(_by_label(side, labels, filename)):
                for onset_s, offset_s in times:
                    roll[math.floor(onset_s / time_resolution) : math.ceil(offset_s / time_resolution), index] = True
            rolls.append(roll)
        ref, est = rolls
        tp += (ref & est).sum(axis=0)
        fp += (est & ~ref).sum(axis=0)
        fn += (ref & ~est).sum(axis=0)
        n_ref, n_est, n_both = ref.sum(axis=1), est.sum(axis=1), (ref & est).sum(axis=1)
        errors += int((np.minimum(n_ref, n_est) - n_both + np.abs(n_ref - n_est)).sum())
        active_truth += int(n_ref.sum())
    return _scores(labels, tp, fp, fn, errors / active_truth if active_truth else math.nan)


def _by_label(events: list[tuple[float, float, str]], labels: list[str], filename: str) -> list[np.ndarray]:
    """One `(events, 2)` float64 array of (onset_s, offset_s) per label, events of other labels left out; an event
    that ends before it starts (or starts before 0) is an error naming the file."""
    index_of = {label: i for i, label in enumerate(labels)}
    times: list[list[tuple[float, float]]] = [[] for _ in labels]
    for onset_s, offset_s, label in events:
        if not 0 <= onset_s <= offset_s:
            raise ValueError(f"{filename}: event {label!r} from {onset_s} s to {offset_s} s; expected "
                             f"0 <= onset <= offset")
        if label in index_of:
            times[index_of[label]].append((onset_s, offset_s))
    return [np.array(t, dtype=np.float64).reshape(-1, 2) for t in times]


def _max_matching(fits: np.ndarray) -> int:
    """Size of a maximum matching of a bipartite graph given as a `(truth, predicted)` bool matrix (Kuhn's
    augmenting paths: any maximum matching has the size Hopcroft-Karp finds)."""
    partner = [-1] * fits.shape[1]  # predicted → truth row it is matched to

    def augment(row: int, seen: np.ndarray) -> bool:
        for column in np.flatnonzero(fits[row]):
            if seen[column]:
                continue
            seen[column] = True
            if partner[column] < 0 or augment(partner[column], seen):
                partner[column] = row
                return True
        return False

    return sum(augment(row, np.zeros(fits.shape[1], dtype=bool)) for row in range(fits.shape[0]))


def _scores(labels: list[str], tp: np.ndarray, fp: np.ndarray, fn: np.ndarray,
            error_rate: float | None = None) -> SedScores:
    class_wise = {label: Counts(int(t), int(p), int(n)) for label, t, p, n in zip(labels, tp, fp, fn)}
    return SedScores(Counts(int(tp.sum()), int(fp.sum()), int(fn.sum())), class_wise, error_rate)
