"""Tag audio files or a live stream with a CED checkpoint (or any tagger the project loads, or an exported ONNX
model, fp32 or int8).

    python -m ced_train.tag FILE... --checkpoint PATH [--top-k 5] [--chunk-seconds 10] [--json]
                                   [--events events.tsv [--truth truth.tsv] [--tune-thresholds OUT.tsv]]
    python -m ced_train.tag --stream FILE|- --checkpoint PATH [--realtime] [--window-s 2] [--hop-s 0.5]
    python -m ced_train.tag --ffmpeg-input "-f pulse -i default" --checkpoint PATH

Files: each file is decoded (wav, flac, ogg, mp3, and via ffmpeg when installed, other formats), downmixed,
resampled to 16 kHz and cut into chunks of `--chunk-seconds`; each chunk's top-k classes are printed with their
probabilities. `--events` also slides `--window-s` windows every `--hop-s` over each file and writes the sound events
(`ced_train.events`) as a DCASE-style TSV; `--truth` scores them (event- and segment-based F1) against a TSV of true
events (`filename onset offset event_label`, filenames matched to the tail of the tagged paths), and
`--tune-thresholds` first picks each class's threshold on these files and writes it.
A file that cannot be read is reported on one line on stderr and the other files are still tagged; the exit code is
then 1. A checkpoint that cannot be loaded, or an ONNX model without the `export` extra, stops the run with exit
code 2.

Stream (`--stream` or `--ffmpeg-input`; sources in `ced_train.streaming`): one JSON line per hop as the audio
arrives (`ced_train.windowed` says what a line holds), events as they open and close, and a last line that closes the
open ones, also on Ctrl-C. Exit codes: `ced_train.streaming.EXIT_CODES` (0 ended, 1 the source broke off, 2 nothing
streamed, 3 only digital silence, 130 interrupted); each non-zero one comes with one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import torch

from ced_train.audio import SAMPLE_RATE, AudioDecodeError, AudioSource, load_audio
from ced_train.events import Thresholds, detect_events, read_events_tsv, tune_thresholds, write_events_tsv
from ced_train.extras import MissingExtra
from ced_train.labels import NUM_AUDIOSET_CLASSES, display_names, load_class_labels
from ced_train.models import CEDModel, CheckpointError, load_checkpoint
from ced_train.models.checkpoint import checkpoint_class_names
from ced_train.sed_metrics import event_based, segment_based
from ced_train.streaming import (EXIT_BROKEN, EXIT_CANNOT_START, EXIT_INTERRUPTED, EXIT_SILENT, PCM_FORMATS,
                                 PcmFormat, SourceError, open_source)
from ced_train.windowed import HOP_S, MEDIAN_HOPS, WINDOW_S, WindowTagger, top_classes, window_scores


def tag_waveform(model: CEDModel, waveform: torch.Tensor, chunk_samples: int) -> torch.Tensor:
    """`(samples,)` float32 at 16 kHz → `(chunks, classes)` probabilities, one row per chunk of `chunk_samples`."""
    chunks = waveform.split(chunk_samples)
    with torch.inference_mode():
        return torch.cat([model(chunk.unsqueeze(0)) for chunk in chunks])


def known_class_names(num_classes: int, label_file: str | None, checkpoint: str | None = None) -> list[str] | None:
    """Display names for the model's outputs: the given label file or shard directory, else the checkpoint's own
    (an HF layout's `id2label`), else AudioSet's for 527 outputs, else None."""
    if label_file is not None:
        names = display_names(label_file)
    else:
        names = (checkpoint_class_names(checkpoint) if checkpoint is not None else None) or (
            list(load_class_labels().names) if num_classes == NUM_AUDIOSET_CLASSES else None)
        if names is None:
            return None
    if len(names) != num_classes:
        raise ValueError(f"labels {label_file or checkpoint} hold {len(names)} classes, the model outputs {num_classes}")
    return names


def class_names(num_classes: int, label_file: str | None, checkpoint: str | None = None) -> list[str]:
    """`known_class_names`, else `class_<i>`."""
    return known_class_names(num_classes, label_file, checkpoint) or [f"class_{i}" for i in range(num_classes)]


def tag_file(model: CEDModel, path: str, names: list[str], top_k: int, chunk_seconds: float) -> dict:
    """Decode and tag one file → `{"file", "duration_s", "chunks": [{"start_s", "end_s", "labels"}]}`."""
    waveform = torch.from_numpy(load_audio(path).waveform)
    if waveform.numel() == 0:
        raise AudioDecodeError(path, "no audio samples")
    chunk_samples = max(1, round(chunk_seconds * SAMPLE_RATE))
    probs = tag_waveform(model, waveform, chunk_samples)
    duration_s = waveform.numel() / SAMPLE_RATE
    chunks = [
        {
            "start_s": round(i * chunk_seconds, 3),
            "end_s": round(min((i + 1) * chunk_seconds, duration_s), 3),
            "labels": top_classes(row, names, top_k),
        }
        for i, row in enumerate(probs)
    ]
    return {"file": path, "duration_s": round(duration_s, 3), "chunks": chunks}


def format_result(result: dict) -> str:
    lines = [f"{result['file']} ({result['duration_s']:.2f} s)"]
    for chunk in result["chunks"]:
        lines.append(f"  [{chunk['start_s']:7.2f} - {chunk['end_s']:7.2f} s]")
        lines.extend(f"    {label['probability']:.3f}  {label['label']}" for label in chunk["labels"])
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ced_train.tag", description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", metavar="FILE", help="audio files to tag")
    parser.add_argument("--checkpoint", required=True, help="official CED .pt, state dict, HF-layout directory, "
                        "ced-train .ckpt or exported .onnx")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="fully unpickle a checkpoint the safe loader refuses (runs code in it: trusted files only)")
    parser.add_argument("--top-k", type=int, default=5, help="classes printed per chunk or hop (default 5)")
    parser.add_argument("--chunk-seconds", type=float, default=10.0, help="chunk length in seconds (default 10)")
    parser.add_argument("--labels", default=None, help="label file (index,mid,display_name) or shard directory; "
                        "default: the checkpoint's own names, AudioSet's for 527 outputs")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    stream = parser.add_argument_group("stream")
    stream.add_argument("--stream", metavar="SOURCE", help="stream a file, or - for standard input (raw PCM as "
                        "--stdin-format/--stdin-rate/--stdin-channels say, or a WAV stream)")
    stream.add_argument("--ffmpeg-input", metavar="ARGS", help='stream what ffmpeg opens with these input options, '
                        'e.g. "-f pulse -i default" or "-f alsa -i hw:0"')
    stream.add_argument("--realtime", action="store_true", help="pace a streamed file at real time")
    stream.add_argument("--stdin-format", choices=tuple(PCM_FORMATS), default="s16le")
    stream.add_argument("--stdin-rate", type=int, default=SAMPLE_RATE, help="raw stdin sample rate (default 16000)")
    stream.add_argument("--stdin-channels", type=int, default=1, help="raw stdin channels, interleaved (default 1)")
    stream.add_argument("--stall-timeout-s", type=float, default=10.0,
                        help="a pipe without data for this long has stalled (default 10; 0: wait forever)")
    events = parser.add_argument_group("windows and events")
    events.add_argument("--window-s", type=float, default=WINDOW_S, help=f"window length (default {WINDOW_S})")
    events.add_argument("--hop-s", type=float, default=HOP_S, help=f"hop between windows (default {HOP_S})")
    events.add_argument("--events", metavar="TSV", help="write the sound events (onset, offset, label, score)")
    events.add_argument("--threshold", type=float, default=0.5, help="event threshold of every class (default 0.5)")
    events.add_argument("--thresholds", metavar="TSV", help="per-class thresholds (label, on[, off]); others get "
                        "--threshold")
    events.add_argument("--median-hops", type=int, default=MEDIAN_HOPS,
                        help=f"median filter over window scores, odd (default {MEDIAN_HOPS})")
    events.add_argument("--truth", metavar="TSV", help="files only: true events to score the events against")
    events.add_argument("--tune-thresholds", metavar="OUT", help="files only, with --truth: pick each class's "
                        "threshold on these files (segment F1), write them to OUT and use them")
    args = parser.parse_args(argv)
    streaming = args.stream is not None or args.ffmpeg_input is not None
    if streaming == bool(args.files):
        parser.error("give audio FILEs, or --stream SOURCE / --ffmpeg-input ARGS, not both")
    if args.stream is not None and args.ffmpeg_input is not None:
        parser.error("--stream and --ffmpeg-input are two sources: give one")
    if args.top_k < 1:
        parser.error(f"--top-k must be >= 1, got {args.top_k}")
    if args.chunk_seconds <= 0:
        parser.error(f"--chunk-seconds must be > 0, got {args.chunk_seconds}")
    if not 0.05 <= args.hop_s <= args.window_s:
        parser.error(f"need 0.05 <= --hop-s <= --window-s, got --hop-s {args.hop_s} --window-s {args.window_s}")
    if args.median_hops < 1 or args.median_hops % 2 == 0:
        parser.error(f"--median-hops must be odd and >= 1, got {args.median_hops}")
    if not 0 < args.threshold < 1:
        parser.error(f"--threshold must be in (0, 1), got {args.threshold}")
    if streaming and (args.truth or args.tune_thresholds):
        parser.error("--truth and --tune-thresholds score files, not a stream")
    if args.tune_thresholds and not args.truth:
        parser.error("--tune-thresholds needs --truth (the true events of the files)")
    if args.stall_timeout_s < 0:
        parser.error(f"--stall-timeout-s must be >= 0, got {args.stall_timeout_s}")
    return args


def load_tagger(checkpoint: str, labels: str | None, trust: bool) -> tuple[torch.nn.Module, list[str]] | None:
    """The model (probabilities) and display names the CLIs tag with; None after printing the one-line error."""
    try:
        if Path(checkpoint).suffix == ".onnx":
            from ced_train.export import OnnxTagger

            model = OnnxTagger(checkpoint)
        else:  # trained checkpoints record pooling "logit" (raw logits for the loss); tagging reports probabilities
            model = load_checkpoint(checkpoint, trust=trust, pooling="mean")
        return model, class_names(model.num_classes, labels, checkpoint)
    except MissingExtra as error:  # the checkpoint is fine; the installation lacks what runs it
        print(f"error: {error}", file=sys.stderr)
        return None
    except (CheckpointError, ValueError, OSError) as error:
        print(f"error: checkpoint {checkpoint}: {error}", file=sys.stderr)
        return None


def read_thresholds(args: argparse.Namespace, names: list[str]) -> Thresholds:
    """`--thresholds` over a `--threshold` default. Raises ValueError naming the file and line."""
    if args.thresholds is None:
        return Thresholds.uniform(len(names), args.threshold)
    return Thresholds.read(args.thresholds, names, default_on=args.threshold)


def stream_main(args: argparse.Namespace, model: torch.nn.Module, names: list[str], thresholds: Thresholds) -> int:
    """`--stream`/`--ffmpeg-input`: JSON lines on stdout as the audio arrives; see the module docstring."""
    try:
        source = open_source(args.stream, args.ffmpeg_input, args.realtime,
                             PcmFormat(args.stdin_rate, args.stdin_channels, args.stdin_format),
                             args.stall_timeout_s or None)
    except SourceError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    tagger = WindowTagger(model, names, args.top_k, args.window_s, args.hop_s, thresholds, args.median_hops)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    code, message = 0, None
    try:
        try:
            for block in source.blocks(tagger.windows.hop_samples):
                for record in tagger.push(block):
                    print(json.dumps(record), flush=True)
        except SourceError as error:
            code, message = error.exit_code, f"error: {error}"
        except KeyboardInterrupt:
            code, message = EXIT_INTERRUPTED, f"stream: {source.name}: interrupted after {tagger.seconds:.2f} s"
        except BrokenPipeError:  # the reader of stdout went away (`| head`): stop as on Ctrl-C
            _discard_stdout()
            code, message = EXIT_INTERRUPTED, f"stream: {source.name}: stdout closed after {tagger.seconds:.2f} s"
        try:
            for record in tagger.finish():
                print(json.dumps(record), flush=True)
        except BrokenPipeError:
            _discard_stdout()
    finally:
        source.close()
        signal.signal(signal.SIGTERM, previous)
    if code == 0 and source.trailing_bytes:
        code, message = EXIT_BROKEN, (f"error: {source.name}: ended mid-sample ({source.trailing_bytes} trailing "
                                      f"bytes of a {source.fmt.frame_bytes}-byte frame dropped)")
    if code == 0 and tagger.peak == 0.0:
        code, message = EXIT_SILENT, (f"stream: {source.name}: " + (
            f"held only digital silence ({tagger.seconds:.2f} s); no events" if tagger.seconds else "no audio samples"))
    if args.events:
        write_events_tsv(args.events, [(source.name, event) for event in tagger.events])
    print(message or f"stream: {source.name}: {tagger.seconds:.2f} s, {len(tagger.events)} events"
          + (f", written to {args.events}" if args.events else ""), file=sys.stderr)
    return code


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so that what is still buffered for a closed pipe is dropped, not raised at exit."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def events_main(args: argparse.Namespace, model: torch.nn.Module, names: list[str], thresholds: Thresholds,
                paths: list[str]) -> None:
    """`--events` (and `--truth`, `--tune-thresholds`) over the files that decoded: each file's windows are scored
    once; thresholds are tuned on those scores, and the events detected from them."""
    scores = [window_scores(model, names, AudioSource.open(path).blocks(), args.window_s, args.hop_s)
              for path in paths]
    truth = read_events_tsv(args.truth) if args.truth else None
    if args.tune_thresholds:
        thresholds = tune_thresholds(scores, [truth_of(truth, path) for path in paths], names,
                                     median_hops=args.median_hops)
        thresholds.write(args.tune_thresholds, names)
        print(f"wrote per-class thresholds tuned on {len(paths)} files to {args.tune_thresholds}", file=sys.stderr)
    events = {path: detect_events(*score, names, thresholds, args.median_hops) for path, score in zip(paths, scores)}
    write_events_tsv(args.events, [(path, event) for path in paths for event in events[path]])
    print(f"wrote {sum(map(len, events.values()))} events of {len(paths)} files to {args.events}", file=sys.stderr)
    if truth is not None:
        reference = {path: truth_of(truth, path) for path in paths}
        predicted = {path: [(e.onset_s, e.offset_s, e.label) for e in events[path]] for path in paths}
        labels = names  # every class the model can report: its false alarms count
        for name, result in (("event-based (collar 0.2 s, 20 %)", event_based(reference, predicted, labels)),
                             ("segment-based (1 s)", segment_based(reference, predicted, labels))):
            overall = result.overall
            print(f"{name}: F1 {overall.f1:.3f}, precision {overall.precision:.3f}, recall {overall.recall:.3f} "
                  f"over {len(paths)} files", file=sys.stderr)


def truth_of(truth: dict[str, list], path: str) -> list:
    """The true events of `path`: the truth entry whose filename is the tail of `path` (none if none)."""
    parts = Path(path).parts
    for name, events in truth.items():
        tail = Path(name).parts
        if parts[-len(tail):] == tail:
            return events
    return []


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    loaded = load_tagger(args.checkpoint, args.labels, args.trust_checkpoint)
    if loaded is None:
        return EXIT_CANNOT_START
    model, names = loaded
    try:
        thresholds = read_thresholds(args, names)
        if args.truth:
            read_events_tsv(args.truth)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CANNOT_START
    if not args.files:
        return stream_main(args, model, names, thresholds)
    results, failed = [], 0
    for path in args.files:
        try:
            result = tag_file(model, path, names, args.top_k, args.chunk_seconds)
        except AudioDecodeError as error:  # its message names the file
            print(f"error: {error}", file=sys.stderr)
            failed += 1
            continue
        results.append(result)
        if not args.json:
            print(format_result(result), flush=True)
    if args.json:
        print(json.dumps({"checkpoint": str(Path(args.checkpoint)), "results": results}, indent=2))
    if args.events:
        events_main(args, model, names, thresholds, [result["file"] for result in results])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
