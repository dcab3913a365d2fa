"""What short windows cost a streaming tagger: clip mAP, event F1, compute per hop, real-time factor and delay of
`ced_train.windowed.WindowTagger` (the path of `tag --stream`) with windows of 1, 2, 5 and 10 s every 0.5 s hop, on
the demo's synthetic eval split.

    python benchmarks/streaming.py [--checkpoint CED_TINY] [--windows 1 2 5 10] [--hop 0.5] [--timing-seconds 120]
                                   [--train-shards data/shards/synthetic/train]

Taggers: the demo's CED-Tiny student (tests/fixtures/demo_student, a weak tagger), one of its MobileNetV3 teachers
(tests/fixtures/demo_teacher.ckpt: a tagger that works on this data) and, with --checkpoint, another CED-Tiny (an
official .pt or HF directory; nothing is downloaded). Each of the 75 eval clips
(data/shards/synthetic/eval) is streamed through a `WindowTagger` of its own, in torch eager fp32, and gives:

- clip mAP (ced_train.metrics) with the clip's score taken as the max, or the mean, over its full-length windows (a
  clip shorter than the window: its one whole-clip window), against one pass over the whole clip. 10 s windows on
  10 s clips are that pass, so the rows meet there.
- event-based F1 (onsets within 0.2 s, offsets within max(0.2 s, 20 % of the event's length); and with a collar of
  one hop, the resolution the detector places events at) and segment-based F1 (1 s segments) of the events the
  stream's detector closes (uniform thresholds: on 0.5, off 0.3; median over 3 hops), micro-averaged over all
  classes (ced_train.sed_metrics, sed_eval's definitions), against the synthetic truth: data/synthetic/eval_events.tsv,
  or, where an older data_prep did not write it, the same rows built from synthetic.json.
- the same events at 2 s windows with per-class thresholds tuned on the labelled train clips (--train-shards, truth
  from balanced_train_events.tsv or synthetic.json; `events.tune_thresholds`, what `tag --tune-thresholds` runs)
  against the uniform 0.5: what tuning buys a tagger whose probabilities are not calibrated to 0.5.

Speed is measured first and apart, on one stream of eval clips back to back, cut to its first --timing-seconds (120
s = 240 hops of the 750 s of eval audio, to keep the run short) and pushed in hop-sized blocks as a live source
delivers them: compute per hop is `WindowTagger`'s `compute_ms` over the stream's
full-length windows after 5 warm-up ones (median and p95; the growing windows of the stream's start are left out),
in torch eager fp32 on --threads threads and, for CED-Tiny, ONNX Runtime fp32 and int8 (`export_onnx`,
`OnnxTagger` on the same threads; speed does not depend on the weights). Real-time factor (RTF) = median compute per
hop / hop. Delay = window + median compute: how long after a sound starts the window that holds all of it (as much
as the window can) has been scored; the detector's median filter decides events median_hops // 2 hops later still.
Target: CED-Tiny ONNX int8 RTF <= 0.05 at 2 s windows. The 1-minute load average before and after the timing is
printed: timings taken while other work shares the cores mean little (torch's threads then wait on each other). About
8 minutes on the 2-core development machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from ced_train.audio import SAMPLE_RATE
from ced_train.data import read_manifest
from ced_train.data.shards import iter_shard
from ced_train.events import Thresholds, detect_events, read_events_tsv, tune_thresholds
from ced_train.export import OnnxTagger, export_onnx
from ced_train.metrics import tagging_metrics
from ced_train.sed_metrics import event_based, segment_based
from ced_train.tag import load_tagger
from ced_train.windowed import HOP_S, MEDIAN_HOPS, WindowTagger, score_window, tag_blocks, window_scores

STUDENT, TEACHER = "tests/fixtures/demo_student", "tests/fixtures/demo_teacher.ckpt"
WARMUP_WINDOWS = 5
TARGET_WINDOW_S, TARGET_RTF = 2.0, 0.05


class Recorded:
    """A tagger that keeps what it returns for every window it scores: `(window samples, (classes,) probs)`."""

    def __init__(self, model) -> None:
        self.model, self.windows = model, []

    def __call__(self, waveform: torch.Tensor) -> torch.Tensor:
        probs = self.model(waveform)
        self.windows.append((waveform.shape[-1], probs[0].float().numpy().copy()))
        return probs


def read_clips(shards: Path) -> tuple[list, np.ndarray, list[str]]:
    """The labelled clips of a shard directory, their `(clips, classes)` multi-hot targets and the class names."""
    manifest = read_manifest(shards)
    clips = [clip for shard in manifest.shards for clip in iter_shard(shard.path)]
    targets = np.zeros((len(clips), manifest.num_classes), dtype=np.int8)
    for row, clip in enumerate(clips):
        targets[row, clip.labels] = 1
    return clips, targets, list(manifest.class_names)


def truth_events(synthetic: Path, split: str = "eval") -> tuple[dict[str, list[tuple[float, float, str]]], str]:
    """filename (relative to audio/<split>/, as the shards' `source_file`) → truth events, and where they came
    from."""
    tsv = synthetic / f"{split}_events.tsv"
    if tsv.is_file():
        return read_events_tsv(tsv), str(tsv)
    # data_prep.synthetic's rule for <split>_events.tsv, for datasets made before it wrote one
    rows = json.loads((synthetic / "synthetic.json").read_text(encoding="utf-8"))["rows"][split]
    events = {row["file"]: sorted((e["onset_s"], round(e["onset_s"] + e["duration_s"], 3), e["class"])
                                  for e in row["events"]) for row in rows if row["defect"] is None}
    return events, f"{synthetic / 'synthetic.json'} (no {split}_events.tsv)"


def stream_clips(model, clips: list, names: list[str], window_s: float,
                 hop_s: float) -> tuple[np.ndarray, np.ndarray, dict[str, list[tuple[float, float, str]]]]:
    """Each clip streamed on its own → `(clips, classes)` max and mean over its full-length windows, and the
    events its detector closed (filename → `(onset_s, offset_s, label)`)."""
    max_scores, mean_scores, events = [], [], {}
    for clip in clips:
        recorded = Recorded(model)
        tagger = WindowTagger(recorded, names, top_k=1, window_s=window_s, hop_s=hop_s)
        for _ in tag_blocks(tagger, [clip.waveform]):
            pass
        full = min(tagger.windows.window_samples, len(clip.waveform))
        probs = np.stack([p for samples, p in recorded.windows if samples == full])
        max_scores.append(probs.max(axis=0))
        mean_scores.append(probs.mean(axis=0))
        events[clip.meta["source_file"]] = [(e.onset_s, e.offset_s, e.label) for e in tagger.events]
    return np.stack(max_scores), np.stack(mean_scores), events


def hop_times_ms(model, names: list[str], stream: np.ndarray, window_s: float,
                 hop_s: float) -> tuple[np.ndarray, np.ndarray]:
    """`stream` pushed hop by hop → compute_ms of the full-length windows after the warm-up, and the tagger's own
    work per hop (ring buffer, top-k, detector: push time − compute), both in ms."""
    tagger = WindowTagger(model, names, top_k=5, window_s=window_s, hop_s=hop_s)
    hop, window = tagger.windows.hop_samples, tagger.windows.window_samples
    compute, overhead = [], []
    for start in range(0, len(stream) - hop + 1, hop):
        started = time.perf_counter()
        (record,) = tagger.push(stream[start : start + hop])
        elapsed_ms = 1000 * (time.perf_counter() - started)
        if round((record["end_s"] - record["start_s"]) * SAMPLE_RATE) == window:
            compute.append(record["compute_ms"])
            overhead.append(elapsed_ms - record["compute_ms"])
    return np.array(compute[WARMUP_WINDOWS:]), np.array(overhead[WARMUP_WINDOWS:])


def event_scores(truth: dict, predicted: dict, names: list[str], hop_s: float) -> dict:
    """Event-based counts (collar 0.2 s, offsets 20 %), event F1 with a one-hop collar and segment F1 (1 s)."""
    return {"events": event_based(truth, predicted, names, t_collar=0.2, percentage_of_length=0.2).overall,
            "hop_collar_f1": event_based(truth, predicted, names, t_collar=hop_s, percentage_of_length=0.2).overall.f1,
            "segment_f1": segment_based(truth, predicted, names, time_resolution=1.0).overall.f1}


def score_taggers(models: dict, clips: list, targets: np.ndarray, truth: dict, names: list[str],
                  windows_s: list[float], hop_s: float) -> dict:
    """(tagger, window_s or "whole clip") → mAP of the max and the mean over windows, event-based counts and
    segment-based F1 of the stream's events (only the first for the whole clip's one pass)."""
    rows, began = {}, time.perf_counter()
    for label, model in models.items():
        whole = np.stack([score_window(model, clip.waveform) for clip in clips])
        rows[label, "whole clip"] = {"map_max": tagging_metrics(targets, whole).mAP}
        for window_s in windows_s:
            max_scores, mean_scores, predicted = stream_clips(model, clips, names, window_s, hop_s)
            rows[label, window_s] = {"map_max": tagging_metrics(targets, max_scores).mAP,
                                     "map_mean": tagging_metrics(targets, mean_scores).mAP,
                                     **event_scores(truth, predicted, names, hop_s)}
        print(f"  scored {label} ({time.perf_counter() - began:.0f} s)", file=sys.stderr, flush=True)
    return rows


def tuned_thresholds_rows(models: dict, train: tuple, evaluation: tuple, names: list[str], window_s: float,
                          hop_s: float) -> dict:
    """(tagger, "uniform" or "tuned") → event-based counts, hop-collar F1 and segment F1 on the eval clips, with
    thresholds uniform (0.5) or tuned per class on the train clips' truth (`tune_thresholds`, segment F1)."""
    (train_clips, train_truth), (eval_clips, eval_truth) = train, evaluation
    rows, began = {}, time.perf_counter()
    for label, model in models.items():
        tuned = tune_thresholds([window_scores(model, names, [clip.waveform], window_s, hop_s) for clip in train_clips],
                                [train_truth.get(clip.meta["source_file"], []) for clip in train_clips], names)
        scores = [window_scores(model, names, [clip.waveform], window_s, hop_s) for clip in eval_clips]
        for kind, thresholds in (("uniform 0.5", Thresholds.uniform(len(names))), ("tuned on train", tuned)):
            predicted = {clip.meta["source_file"]: [(e.onset_s, e.offset_s, e.label) for e in
                                                    detect_events(*score, names, thresholds, MEDIAN_HOPS)]
                         for clip, score in zip(eval_clips, scores)}
            rows[label, kind] = event_scores(eval_truth, predicted, names, hop_s)
        print(f"  tuned thresholds of {label} ({time.perf_counter() - began:.0f} s)", file=sys.stderr, flush=True)
    return rows


def time_runtimes(student, teacher, names: list[str], stream: np.ndarray, windows_s: list[float], hop_s: float,
                  threads: int) -> tuple[dict, np.ndarray]:
    """(tagger, runtime, window_s) → compute_ms per hop of `stream`, and the tagger's own work per hop (all rows)."""
    timings, overheads = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        runtimes = {("CED-Tiny", "torch eager fp32"): student, ("MobileNetV3", "torch eager fp32"): teacher}
        for kind, quantize in (("fp32", "none"), ("int8", "int8")):
            path = export_onnx(student, Path(tmp) / f"ced_tiny_{kind}.onnx", quantize=quantize)
            runtimes["CED-Tiny", f"ONNX Runtime {kind}"] = OnnxTagger(path, threads=threads)
        for key, model in runtimes.items():
            for window_s in windows_s:
                timings[(*key, window_s)], overhead = hop_times_ms(model, names, stream, window_s, hop_s)
                overheads.append(overhead)
    return timings, np.concatenate(overheads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None, help="another CED-Tiny to score beside the demo's (official "
                        ".pt or HF directory)")
    parser.add_argument("--windows", type=float, nargs="+", default=[1.0, 2.0, 5.0, 10.0], help="window lengths, s")
    parser.add_argument("--hop", type=float, default=HOP_S, help=f"hop in seconds (default {HOP_S}, tag --stream's)")
    parser.add_argument("--timing-seconds", type=float, default=120.0, help="length of the timed stream, s")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shards", type=Path, default=Path("data/shards/synthetic/eval"))
    parser.add_argument("--train-shards", type=Path, default=Path("data/shards/synthetic/train"),
                        help="labelled clips (of the synthetic balanced_train split) to tune thresholds on")
    parser.add_argument("--synthetic", type=Path, default=Path("data/synthetic"))
    args = parser.parse_args()
    if not (args.shards / "manifest.json").is_file() or not (args.synthetic / "synthetic.json").is_file():
        sys.exit(f"streaming.py needs the demo's eval shards ({args.shards}) and synthetic dataset "
                 f"({args.synthetic}): run `make demo` first")
    began = time.perf_counter()
    torch.set_num_threads(args.threads)

    clips, targets, names = read_clips(args.shards)
    truth_by_file, truth_source = truth_events(args.synthetic)
    files = [clip.meta["source_file"] for clip in clips]
    if not set(files) & set(truth_by_file):
        sys.exit(f"{truth_source}: names none of the {len(files)} clips of {args.shards} (e.g. {files[0]})")
    truth = {file: truth_by_file.get(file, []) for file in files}
    unknown = sorted({label for events in truth.values() for _, _, label in events} - set(names))
    if unknown:
        sys.exit(f"{truth_source}: labels {unknown} are not class names of {args.shards}")

    taggers = {"CED-Tiny, demo student": STUDENT, "MobileNetV3, demo teacher": TEACHER}
    if args.checkpoint:
        taggers[f"CED-Tiny, {Path(args.checkpoint).name}"] = args.checkpoint
    models = {}
    for label, path in taggers.items():
        loaded = load_tagger(path, None, False)
        if loaded is None:
            sys.exit(2)
        models[label] = loaded[0].eval()
        if models[label].num_classes != len(names):
            sys.exit(f"{path}: {models[label].num_classes} outputs, {args.shards} has {len(names)} classes")

    stream = np.concatenate([clip.waveform for clip in clips])[: round(args.timing_seconds * SAMPLE_RATE)]
    load_before = os.getloadavg()[0]
    timings, overheads = time_runtimes(models["CED-Tiny, demo student"], models["MobileNetV3, demo teacher"], names,
                                       stream, args.windows, args.hop, args.threads)
    load_after = os.getloadavg()[0]
    print(f"  timed ({time.perf_counter() - began:.0f} s)", file=sys.stderr, flush=True)
    accuracy = score_taggers(models, clips, targets, truth, names, args.windows, args.hop)
    train_clips = read_clips(args.train_shards)[0]
    tuning = tuned_thresholds_rows(models, (train_clips, truth_events(args.synthetic, "balanced_train")[0]),
                                   (clips, truth), names, TARGET_WINDOW_S, args.hop)

    print(f"Streaming tagger, windows every {args.hop:g} s hop, {len(clips)} eval clips of {args.shards}; "
          f"{os.cpu_count()} cores, {args.threads} threads, torch {torch.__version__}, onnxruntime "
          f"{onnxruntime.__version__}; truth: {sum(map(len, truth.values()))} events from {truth_source}")
    print("\nAccuracy (torch eager fp32): clip mAP with each clip scored by the max / mean over its full-length "
          "windows; event-based F1 (collar 0.2 s, offsets 20 %) and segment-based F1 (1 s) of the stream's events, "
          f"uniform thresholds on 0.5 / off 0.3, median over {MEDIAN_HOPS} hops\n")
    print("| tagger | window | mAP, max over windows | mAP, mean over windows | events predicted (matched) | "
          f"event F1 | event F1, {args.hop:g} s collar | segment F1 |")
    print("|---|---|---|---|---|---|---|---|")
    for (label, window_s), row in accuracy.items():
        if window_s == "whole clip":
            print(f"| {label} | whole clip (one pass) | {100 * row['map_max']:.2f} | | | | | |")
            continue
        events = row["events"]
        print(f"| {label} | {window_s:g} s | {100 * row['map_max']:.2f} | {100 * row['map_mean']:.2f} | "
              f"{events.tp + events.fp} ({events.tp}) | {100 * events.f1:.1f} | {100 * row['hop_collar_f1']:.1f} | "
              f"{100 * row['segment_f1']:.1f} |")
    if TARGET_WINDOW_S in args.windows:
        for label in models:
            whole, windowed = accuracy[label, "whole clip"]["map_max"], accuracy[label, TARGET_WINDOW_S]
            print(f"mAP of {TARGET_WINDOW_S:g} s windows - whole clip (negative: a loss), {label}: "
                  f"{100 * (windowed['map_max'] - whole):+.2f} (max over windows), "
                  f"{100 * (windowed['map_mean'] - whole):+.2f} (mean)")

    print(f"\nEvents with per-class thresholds tuned on the {len(train_clips)} clips of {args.train_shards} "
          f"(tune_thresholds: each class's best segment F1; tag --tune-thresholds) against the uniform 0.5, "
          f"{TARGET_WINDOW_S:g} s windows, scored on the eval clips as above\n")
    print(f"| tagger | thresholds | events predicted (matched) | event F1 | event F1, {args.hop:g} s collar | "
          "segment F1 |")
    print("|---|---|---|---|---|---|")
    for (label, kind), row in tuning.items():
        events = row["events"]
        print(f"| {label} | {kind} | {events.tp + events.fp} ({events.tp}) | {100 * events.f1:.1f} | "
              f"{100 * row['hop_collar_f1']:.1f} | {100 * row['segment_f1']:.1f} |")

    counts = [len(compute) for compute in timings.values()]
    timed_hops = len(stream) // round(args.hop * SAMPLE_RATE)
    print(f"\nSpeed: compute per hop over {min(counts)}-{max(counts)} full-length windows of a "
          f"{timed_hops * args.hop:g} s stream ({timed_hops} hops, {WARMUP_WINDOWS} warm-up windows left out); "
          f"RTF = median / {args.hop:g} s hop; delay = window + median compute, event decisions "
          f"+{MEDIAN_HOPS // 2} x {args.hop:g} s (median filter over {MEDIAN_HOPS} hops); 1-minute load average "
          f"{load_before:.1f} before, {load_after:.1f} after ({os.cpu_count()} cores: above that, other work shared "
          "them)\n")
    print("| tagger | runtime | window | compute/hop median | p95 | RTF | delay | event decision delay |")
    print("|---|---|---|---|---|---|---|---|")
    for (tagger, runtime, window_s), compute in timings.items():
        median_ms, p95_ms = np.median(compute), np.percentile(compute, 95)
        delay_s = window_s + median_ms / 1000
        print(f"| {tagger} | {runtime} | {window_s:g} s | {median_ms:.1f} ms | {p95_ms:.1f} ms | "
              f"{median_ms / (1000 * args.hop):.4f} | {delay_s:.2f} s | "
              f"{delay_s + MEDIAN_HOPS // 2 * args.hop:.2f} s |")
    print(f"WindowTagger's own work per hop (ring buffer, top-5, event detector): median {np.median(overheads):.2f} ms")
    if TARGET_WINDOW_S in args.windows:
        compute = timings["CED-Tiny", "ONNX Runtime int8", TARGET_WINDOW_S]
        rtf = np.median(compute) / (1000 * args.hop)
        print(f"CED-Tiny ONNX int8 RTF at {TARGET_WINDOW_S:g} s windows: {rtf:.4f} (p95 "
              f"{np.percentile(compute, 95) / (1000 * args.hop):.4f}; target <= {TARGET_RTF}): "
              f"{'PASS' if rtf <= TARGET_RTF else 'MISS'}")
    print(f"total {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
