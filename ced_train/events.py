"""Sound events from a clip tagger's sliding-window scores, per-class thresholds for them, and their TSV files.

A tagger scores overlapping windows of a stream (e.g. 2 s every 0.5 s hop); `EventDetector` turns the sequence of
`(classes,)` probabilities into per-class events, online, with bounded memory:

- Median filter: each class's score of window j is the median of the raw scores of windows j − h .. j + h
  (h = median_hops // 2; at the stream's edges, of the windows that exist). Online, window j is therefore decided
  when window j + h arrives (at `close` for the last h windows). A centred median removes spikes and dips shorter
  than h + 1 windows and does not shift a monotone rise or fall.
- Hysteresis: an event opens when the filtered score reaches `on` and closes at the first window whose filtered
  score falls below `off` (off <= on), so a dip that stays above `off` does not split it.
- Time mapping: window j stands for the span from the midpoint of its centre c_j and the previous centre c_{j−1}
  (0 for the first window) to the midpoint of c_j and c_{j+1} (the stream's end for the last); an event over
  windows a..b runs from the start of a's span to the end of b's span. This is what lets a 2 s window place an onset
  to within about a hop rather than its length: a window is half covered by a sound that starts at its centre, so
  where the score crosses `on` near half coverage the first window above it is centred less than a hop after the
  onset, and its span starts half a hop before its centre (onset error within ± hop / 2). Offsets work the same way
  with off = on; the hysteresis makes them later by about (on − off) × window (see `OFF_FRACTION`).

TSV files (DCASE task 4 layout, times in seconds with 3 decimals, written under a temporary name then renamed):
`filename\\tonset\\toffset\\tevent_label[\\tscore]` for events, `label\\ton[\\toff]` for thresholds.
"""

from __future__ import annotations

import math
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ced_train.sed_metrics import segment_based

# off = OFF_FRACTION × on where a threshold file or caller gives no off; chosen from the window geometry, not tuned
# on data. A ratio rather than a fixed margin, so that the low thresholds of rare classes keep a gap in proportion.
# Where a tagger's score follows how much of the window a sound fills (on a plateau of 1: a slope of 1 / window per
# second), closing at `off` instead of `on` delays offsets by about (on − off) × window = 0.4 × on × window: 0.4 s
# for 2 s windows at on = 0.5, under the 0.5 s hop (a half would reach it). The gap is otherwise as wide as that
# allows, so that a dip of up to 40 % of the opening level over several windows (a louder sound masking this one, a
# stretch between the bursts of an intermittent sound; the median filter takes care of single windows) does not split
# an event.
OFF_FRACTION = 0.6
EVENTS_HEADER = ("filename", "onset", "offset", "event_label")


def default_off(on: np.ndarray | float) -> np.ndarray:
    """`OFF_FRACTION * on` as float32, computed from `on` rounded to float32 (so every path gives the same bits)."""
    return (np.asarray(on, dtype=np.float32).astype(np.float64) * OFF_FRACTION).astype(np.float32)


@dataclass(frozen=True)
class Event:
    """One detected event of class `index` (`label` its name); times in seconds since the stream's start. While the
    event is open, `offset_s` is NaN and `score` the highest filtered probability so far."""

    label: str
    index: int
    onset_s: float
    offset_s: float
    score: float


@dataclass(frozen=True)
class Thresholds:
    """Per-class thresholds on filtered probabilities: `on`, `off` `(classes,)` float32, 0 <= off <= on <= 1."""

    on: np.ndarray
    off: np.ndarray

    def __post_init__(self) -> None:
        on, off = np.asarray(self.on, dtype=np.float32), np.asarray(self.off, dtype=np.float32)
        if on.ndim != 1 or on.shape != off.shape:
            raise ValueError(f"Thresholds: on and off must both have shape (classes,), got {on.shape} and {off.shape}")
        bad = np.flatnonzero(~((0 <= off) & (off <= on) & (on <= 1)))
        if len(bad):
            raise ValueError(f"Thresholds: class {bad[0]} has on {on[bad[0]]}, off {off[bad[0]]}; expected "
                             f"0 <= off <= on <= 1")
        object.__setattr__(self, "on", on)
        object.__setattr__(self, "off", off)

    @classmethod
    def uniform(cls, num_classes: int, on: float = 0.5, off: float | None = None) -> Thresholds:
        """The same `on` for every class; `off` defaults to `OFF_FRACTION * on`."""
        on_array = np.full(num_classes, on, dtype=np.float32)
        return cls(on_array, default_off(on_array) if off is None else np.full(num_classes, off, dtype=np.float32))

    @classmethod
    def read(cls, path: Path, names: list[str], default_on: float = 0.5) -> Thresholds:
        """A `label\\ton[\\toff]` TSV (header first) over `names`; classes it does not list get `default_on`, and a
        missing off is `OFF_FRACTION * on`."""
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        header = lines[0].split("\t") if lines else []
        if header not in (["label", "on"], ["label", "on", "off"]):
            raise ValueError(f"{path}:1: expected the header 'label<TAB>on[<TAB>off]', found {header}")
        index_of = {name: i for i, name in enumerate(names)}
        thresholds = cls.uniform(len(names), default_on)
        on, off, seen = thresholds.on.copy(), thresholds.off.copy(), set()
        for number, line in enumerate(lines[1:], start=2):
            fields = line.split("\t")
            if len(fields) != len(header):
                raise ValueError(f"{path}:{number}: expected {len(header)} tab-separated fields, found {len(fields)}")
            label = fields[0]
            if label not in index_of:
                raise ValueError(f"{path}:{number}: label {label!r} is not one of the {len(names)} class names")
            if label in seen:
                raise ValueError(f"{path}:{number}: label {label!r} is listed twice")
            try:
                values = [float(field) for field in fields[1:]]
            except ValueError:
                raise ValueError(f"{path}:{number}: thresholds {fields[1:]} of {label!r} are not numbers") from None
            line_on = values[0]
            line_off = values[1] if len(values) == 2 else float(default_off(line_on))
            if not 0 <= line_off <= line_on <= 1:
                raise ValueError(f"{path}:{number}: {label!r} has on {line_on}, off {line_off}; expected "
                                 f"0 <= off <= on <= 1")
            seen.add(label)
            on[index_of[label]], off[index_of[label]] = line_on, line_off
        return cls(on, off)

    def write(self, path: Path, names: list[str]) -> None:
        """All classes as a `label\\ton\\toff` TSV, each value the shortest text that reads back to the same float32."""
        if len(names) != len(self.on):
            raise ValueError(f"Thresholds.write: {len(names)} names for {len(self.on)} classes ({path})")
        _write_lines(Path(path), ["label\ton\toff"] + [f"{_field(name, path)}\t{_shortest(a)}\t{_shortest(b)}"
                                                        for name, a, b in zip(names, self.on, self.off)])


class EventDetector:
    """Online event detection over a stream of window scores (see the module docstring).

    Args:
        names: `(classes,)` class names, the labels of the events.
        thresholds: per-class `on` / `off`.
        median_hops: odd number (>= 1) of consecutive windows in the median filter; decisions lag by
            `median_hops // 2` windows.
    """

    def __init__(self, names: list[str], thresholds: Thresholds, median_hops: int = 3) -> None:
        if len(names) != len(thresholds.on):
            raise ValueError(f"EventDetector: {len(names)} names but thresholds for {len(thresholds.on)} classes")
        if median_hops < 1 or median_hops % 2 == 0:
            raise ValueError(f"EventDetector: median_hops must be odd and >= 1, got {median_hops}")
        self.names, self.thresholds, self.median_hops = list(names), thresholds, median_hops
        self._windows: deque[tuple[float, float, np.ndarray]] = deque(maxlen=median_hops)
        self._reset()

    def _reset(self) -> None:
        self._windows.clear()
        self._pushed = self._decided = 0
        self._previous_centre_s = 0.0  # centre of the last decided window
        self._open = np.zeros(len(self.names), dtype=bool)
        self._onset_s = np.zeros(len(self.names))
        self._score = np.zeros(len(self.names), dtype=np.float32)

    def push(self, start_s: float, end_s: float, probs: np.ndarray) -> tuple[list[Event], list[Event]]:
        """Add the next window, `[start_s, end_s]` in seconds, with its `(classes,)` probabilities; return the events
        (opened, closed) that this window lets the detector decide, each list in class order."""
        probs = np.asarray(probs, dtype=np.float32)
        if probs.shape != (len(self.names),):
            raise ValueError(f"EventDetector.push: probs has shape {probs.shape}, expected ({len(self.names)},)")
        if self._windows and start_s + end_s < sum(self._windows[-1][:2]):
            raise ValueError(f"EventDetector.push: window [{start_s}, {end_s}] s is centred before the previous one "
                             f"{list(self._windows[-1][:2])}")
        self._windows.append((float(start_s), float(end_s), probs))
        self._pushed += 1
        if self._pushed - self._decided > self.median_hops // 2:
            return self._decide()
        return [], []

    def close(self, end_s: float) -> list[Event]:
        """End of stream at `end_s` seconds: decide the pending windows and close every open event, at `end_s` at
        the latest; return the events closed, in the order they closed. The detector is then ready for a new stream."""
        if self._windows and end_s < sum(self._windows[-1][:2]) / 2:
            raise ValueError(f"EventDetector.close: end {end_s} s is before the centre of the last window "
                             f"{list(self._windows[-1][:2])}")
        closed = []
        while self._decided < self._pushed:
            closed += self._decide()[1]
        closed += [Event(self.names[i], int(i), float(self._onset_s[i]), float(end_s), float(self._score[i]))
                   for i in np.flatnonzero(self._open)]
        self._reset()
        return closed

    def _decide(self) -> tuple[list[Event], list[Event]]:
        """Decide window `self._decided`, the median over the buffered windows within `median_hops // 2` of it."""
        j, half = self._decided, self.median_hops // 2
        first = self._pushed - len(self._windows)  # stream index of the oldest buffered window
        neighbours = [w[2] for k, w in enumerate(self._windows, start=first) if abs(k - j) <= half]
        filtered = np.median(np.stack(neighbours), axis=0).astype(np.float32)
        start_s, end_s, _ = self._windows[j - first]
        centre_s = (start_s + end_s) / 2
        span_start_s = 0.0 if j == 0 else (self._previous_centre_s + centre_s) / 2

        closing = np.flatnonzero(self._open & (filtered < self.thresholds.off))
        closed = [Event(self.names[i], int(i), float(self._onset_s[i]), span_start_s, float(self._score[i]))
                  for i in closing]
        self._open[closing] = False
        self._score = np.where(self._open, np.maximum(self._score, filtered), self._score)
        opening = np.flatnonzero(~self._open & (filtered >= self.thresholds.on))
        self._open[opening] = True
        self._onset_s[opening] = span_start_s
        self._score[opening] = filtered[opening]
        opened = [Event(self.names[i], int(i), span_start_s, math.nan, float(filtered[i])) for i in opening]

        self._previous_centre_s = centre_s
        self._decided += 1
        return opened, closed


def detect_events(starts_s: np.ndarray, ends_s: np.ndarray, probs: np.ndarray, names: list[str],
                  thresholds: Thresholds, median_hops: int = 3) -> list[Event]:
    """Offline detection: `EventDetector` fed `(windows,)` start and end times in seconds with `(windows, classes)`
    probabilities, closed at the last end; the complete events sorted by onset, then label."""
    if not len(starts_s) == len(ends_s) == len(probs):
        raise ValueError(f"detect_events: {len(starts_s)} starts, {len(ends_s)} ends and {len(probs)} rows of probs; "
                         f"expected one of each per window")
    detector, events = EventDetector(names, thresholds, median_hops), []
    for start_s, end_s, window_probs in zip(starts_s, ends_s, probs):
        events += detector.push(float(start_s), float(end_s), window_probs)[1]
    if len(ends_s):
        events += detector.close(float(ends_s[-1]))
    return sorted(events, key=lambda e: (e.onset_s, e.label))


def tune_thresholds(window_scores: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
                    truth: list[list[tuple[float, float, str]]], names: list[str],
                    candidates: np.ndarray = np.linspace(0.05, 0.95, 19), median_hops: int = 3,
                    default_on: float = 0.5) -> Thresholds:
    """Per class, the `on` among `candidates` that maximises its segment-based F1 (1 s segments) over labelled files.

    Args:
        window_scores: per file, `(starts_s, ends_s, probs)` as `detect_events` takes them.
        truth: per file (same order), its `(onset_s, offset_s, label)` events.
        names: `(classes,)` class names.
        candidates: `on` values tried, each with off = `OFF_FRACTION * on`.
        median_hops: as `EventDetector` uses it.
        default_on: `on` of the classes without any truth event.

    Among equally good candidates the middle one is taken (the widest margin to both sides of a score gap).
    """
    if len(window_scores) != len(truth):
        raise ValueError(f"tune_thresholds: {len(window_scores)} files of window scores but {len(truth)} of truth")
    truth_by_file = {f"truth[{i}]": list(events) for i, events in enumerate(truth)}
    f1 = np.zeros((len(candidates), len(names)))
    for row, on in enumerate(candidates):
        thresholds = Thresholds.uniform(len(names), float(on))
        predicted = {f"truth[{i}]": [(e.onset_s, e.offset_s, e.label)
                                     for e in detect_events(*scores, names, thresholds, median_hops)]
                     for i, scores in enumerate(window_scores)}
        class_wise = segment_based(truth_by_file, predicted, names).class_wise
        f1[row] = [class_wise[name].f1 for name in names]
    f1 = np.nan_to_num(f1, nan=0.0)  # NaN: nothing predicted, or no truth (then the default applies anyway)
    present = {label for events in truth for _, _, label in events}
    on = np.full(len(names), default_on, dtype=np.float32)
    for index, name in enumerate(names):
        if name in present:
            best = np.flatnonzero(f1[:, index] == f1[:, index].max())
            on[index] = candidates[best[(len(best) - 1) // 2]]
    return Thresholds(on, default_off(on))


def write_events_tsv(path: Path, rows: list[tuple[str, Event]]) -> None:
    """Detected events as `filename\\tonset\\toffset\\tevent_label\\tscore` (DCASE task 4 plus a score column)."""
    lines = ["\t".join(EVENTS_HEADER + ("score",))]
    for filename, event in rows:
        if math.isnan(event.offset_s):
            raise ValueError(f"write_events_tsv: {filename}: event {event.label!r} at {event.onset_s:.3f} s is still "
                             f"open (no offset) ({path})")
        lines.append(f"{_field(filename, path)}\t{event.onset_s:.3f}\t{event.offset_s:.3f}\t"
                     f"{_field(event.label, path)}\t{event.score:.4f}")
    _write_lines(Path(path), lines)


def write_truth_tsv(path: Path, events: dict[str, list[tuple[float, float, str]]]) -> None:
    """Reference events (filename → `(onset_s, offset_s, label)`) as a DCASE task 4 truth file, in the given order."""
    lines = ["\t".join(EVENTS_HEADER)]
    lines += [f"{_field(filename, path)}\t{onset_s:.3f}\t{offset_s:.3f}\t{_field(label, path)}"
              for filename, file_events in events.items() for onset_s, offset_s, label in file_events]
    _write_lines(Path(path), lines)


def read_events_tsv(path: Path) -> dict[str, list[tuple[float, float, str]]]:
    """A DCASE truth file or `write_events_tsv`'s output: filename → `(onset_s, offset_s, label)` in file order (the
    score column, if any, is not returned)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    header = tuple(lines[0].split("\t")) if lines else ()
    if header not in (EVENTS_HEADER, EVENTS_HEADER + ("score",)):
        raise ValueError(f"{path}:1: expected the header '{chr(9).join(EVENTS_HEADER)}[<TAB>score]', found "
                         f"{list(header)}")
    events: dict[str, list[tuple[float, float, str]]] = {}
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        try:
            if len(fields) != len(header):
                raise ValueError(f"{len(fields)} tab-separated fields, expected {len(header)}")
            onset_s, offset_s = float(fields[1]), float(fields[2])
            if not 0 <= onset_s <= offset_s < math.inf:
                raise ValueError(f"onset {fields[1]}, offset {fields[2]}; expected 0 <= onset <= offset")
            if not fields[0] or not fields[3]:
                raise ValueError("empty filename or event_label")
        except ValueError as error:
            raise ValueError(f"{path}:{number}: {error}") from None
        events.setdefault(fields[0], []).append((onset_s, offset_s, fields[3]))
    return events


def _shortest(value: np.float32) -> str:
    return np.format_float_positional(value, unique=True, trim="-")


def _field(text: str, path: Path) -> str:
    if "\t" in text or "\n" in text or "\r" in text:
        raise ValueError(f"{path}: {text!r} holds a tab or line break, which the TSV layout cannot store")
    return text


def _write_lines(path: Path, lines: list[str]) -> None:
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
