"""Tagging by sliding windows: every hop, the tagger scores the last window of the stream and the event detector
turns the scores into sound events. One path for `tag --stream`, `tag --events` on files, the page's listen mode
and `benchmarks/streaming.py`, so a file tagged offline and the same file streamed give the same records.

A record (one per hop, a JSON object): `{"start_s", "end_s", "top": [{"index", "label", "probability"}],
"opened": [{"index", "label", "onset_s", "score"}], "closed": [{"index", "label", "onset_s", "offset_s", "score"}],
"compute_ms"}`; times in seconds since the stream's start. Opened events are reported when the detector decides them
(`median_hops // 2` hops after their first window); each is closed once, at the latest by `finish`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

import numpy as np
import torch

from ced_train.audio import SAMPLE_RATE
from ced_train.events import Event, EventDetector, Thresholds
from ced_train.streaming import SlidingWindows, Window

# The defaults `tag --stream` and the page use; `benchmarks/streaming.py` measures what other lengths cost.
WINDOW_S, HOP_S, MEDIAN_HOPS = 2.0, 0.5, 3
# Shorter windows are not scored (the front end's 512-sample FFT); only a stream's very start or end can be shorter.
MIN_WINDOW_SAMPLES = 512


def top_classes(probs: torch.Tensor, names: list[str], k: int) -> list[dict]:
    """`(classes,)` probabilities → the `k` most probable as `{"index", "label", "probability"}`, descending; each
    probability is the model's float32 value (as a Python float, so JSON keeps every digit)."""
    values, indices = probs.topk(min(k, probs.numel()))
    return [
        {"index": int(i), "label": names[i], "probability": float(v)}
        for v, i in zip(values.tolist(), indices.tolist())
    ]


def score_window(model: torch.nn.Module, samples: np.ndarray) -> np.ndarray:
    """`(samples,)` float32 at 16 kHz → `(classes,)` float32 probabilities of a tagger (a torch model or an
    `OnnxTagger`: `(batch, samples)` → `(batch, classes)`)."""
    with torch.inference_mode():
        return model(torch.from_numpy(np.ascontiguousarray(samples))[None])[0].float().numpy()


class WindowTagger:
    """Scores each hop's window of a stream with `model` and detects events; `push` blocks, then `finish`.

    Args:
        model: a tagger returning probabilities (`load_tagger`).
        names: `(classes,)` display names.
        top_k: classes per record.
        window_s, hop_s: window length and hop in seconds (hop <= window).
        thresholds: per-class event thresholds (default: `Thresholds.uniform`).
        median_hops: odd length of the median filter over window scores.
        keep_scores: keep every window's `(start_s, end_s, probs)` in `scores` (for tuning thresholds; memory grows
            with the stream).
    """

    def __init__(self, model: torch.nn.Module, names: list[str], top_k: int = 5, window_s: float = WINDOW_S,
                 hop_s: float = HOP_S, thresholds: Thresholds | None = None, median_hops: int = MEDIAN_HOPS,
                 keep_scores: bool = False) -> None:
        self.model, self.names, self.top_k = model, names, top_k
        self.windows = SlidingWindows(round(window_s * SAMPLE_RATE), round(hop_s * SAMPLE_RATE))
        self.detector = EventDetector(names, thresholds or Thresholds.uniform(len(names)), median_hops)
        self.events: list[Event] = []  # closed so far, in the order they closed
        self.peak = 0.0  # largest |sample| so far: 0 means digital silence
        self.scores: list[tuple[float, float, np.ndarray]] | None = [] if keep_scores else None

    @property
    def seconds(self) -> float:
        """Audio streamed so far, in seconds."""
        return self.windows.total_samples / SAMPLE_RATE

    def push(self, block: np.ndarray) -> list[dict]:
        """Add `(n,)` float32 samples at 16 kHz; the records of the hops that ended inside them."""
        if len(block):
            self.peak = max(self.peak, float(np.abs(block).max()))
        return [self._record(window) for window in self.windows.push(block)]

    def finish(self) -> list[dict]:
        """End of stream: the last (partial-hop) window's record, if any, and a record closing the open events."""
        window = self.windows.finish()
        records = [self._record(window)] if window is not None and len(window.samples) >= MIN_WINDOW_SAMPLES else []
        closed = self.detector.close(self.seconds)
        self.events.extend(closed)
        records.append({"start_s": None, "end_s": round(self.seconds, 3), "top": [], "opened": [],
                        "closed": [_event(e) for e in closed], "compute_ms": 0.0})
        return records

    def _record(self, window: Window) -> dict:
        started = time.perf_counter()
        probs = score_window(self.model, window.samples)
        compute_ms = 1000 * (time.perf_counter() - started)
        if self.scores is not None:
            self.scores.append((window.start_s, window.end_s, probs))
        opened, closed = self.detector.push(window.start_s, window.end_s, probs)
        self.events.extend(closed)
        return {"start_s": round(window.start_s, 3), "end_s": round(window.end_s, 3),
                "top": top_classes(torch.from_numpy(probs), self.names, self.top_k),
                "opened": [_event(e) for e in opened], "closed": [_event(e) for e in closed],
                "compute_ms": round(compute_ms, 3)}


def _event(event: Event) -> dict:
    record = {"index": event.index, "label": event.label, "onset_s": round(event.onset_s, 3)}
    if not np.isnan(event.offset_s):
        record["offset_s"] = round(event.offset_s, 3)
    record["score"] = round(event.score, 4)
    return record


def tag_blocks(tagger: WindowTagger, blocks: Iterable[np.ndarray]) -> Iterator[dict]:
    """Every record of a stream of blocks, the closing one last."""
    for block in blocks:
        yield from tagger.push(block)
    yield from tagger.finish()


def window_scores(model: torch.nn.Module, names: list[str], blocks: Iterable[np.ndarray], window_s: float = WINDOW_S,
                  hop_s: float = HOP_S) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every scored window of a stream of blocks → `(starts_s, ends_s, (windows, classes) probs)`, as
    `ced_train.events.detect_events` and `tune_thresholds` take them (no windows: empty arrays)."""
    tagger = WindowTagger(model, names, 1, window_s, hop_s, keep_scores=True)
    for _ in tag_blocks(tagger, blocks):
        pass
    if not tagger.scores:  # shorter than the shortest window scored
        return np.zeros(0), np.zeros(0), np.zeros((0, len(names)), np.float32)
    starts, ends, probs = zip(*tagger.scores)
    return np.array(starts), np.array(ends), np.stack(probs)
