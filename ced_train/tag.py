"""Tag audio files with a CED checkpoint.

    python -m ced_train.tag FILE... --checkpoint PATH [--top-k 5] [--chunk-seconds 10] [--json]

Each file is decoded (wav, flac, ogg, mp3, and via ffmpeg when installed, other formats), downmixed, resampled to
16 kHz and cut into chunks of `--chunk-seconds`; each chunk's top-k classes are printed with their probabilities.
A file that cannot be read is reported on one line on stderr and the other files are still tagged; the exit code is
then 1. A checkpoint that cannot be loaded stops the run with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ced_train.audio import SAMPLE_RATE, AudioDecodeError, load_audio
from ced_train.labels import NUM_AUDIOSET_CLASSES, display_names, load_class_labels
from ced_train.models import CEDModel, CheckpointError, load_checkpoint
from ced_train.models.checkpoint import checkpoint_class_names


def tag_waveform(model: CEDModel, waveform: torch.Tensor, chunk_samples: int) -> torch.Tensor:
    """`(samples,)` float32 at 16 kHz → `(chunks, classes)` probabilities, one row per chunk of `chunk_samples`."""
    chunks = waveform.split(chunk_samples)
    with torch.inference_mode():
        return torch.cat([model(chunk.unsqueeze(0)) for chunk in chunks])


def top_classes(probs: torch.Tensor, names: list[str], k: int) -> list[dict]:
    """`(classes,)` probabilities → the `k` most probable as `{"index", "label", "probability"}`, descending; each
    probability is the model's float32 value (as a Python float, so JSON keeps every digit)."""
    values, indices = probs.topk(min(k, probs.numel()))
    return [
        {"index": int(i), "label": names[i], "probability": float(v)}
        for v, i in zip(values.tolist(), indices.tolist())
    ]


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
    parser.add_argument("files", nargs="+", metavar="FILE", help="audio files to tag")
    parser.add_argument("--checkpoint", required=True,
                        help="official CED .pt, state dict, HF-layout directory or ced-train .ckpt")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="fully unpickle a checkpoint the safe loader refuses (runs code in it: trusted files only)")
    parser.add_argument("--top-k", type=int, default=5, help="classes printed per chunk (default 5)")
    parser.add_argument("--chunk-seconds", type=float, default=10.0, help="chunk length in seconds (default 10)")
    parser.add_argument("--labels", default=None, help="label file (index,mid,display_name) or shard directory; "
                        "default: the checkpoint's own names, AudioSet's for 527 outputs")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error(f"--top-k must be >= 1, got {args.top_k}")
    if args.chunk_seconds <= 0:
        parser.error(f"--chunk-seconds must be > 0, got {args.chunk_seconds}")
    return args


def load_tagger(checkpoint: str, labels: str | None, trust: bool) -> tuple[torch.nn.Module, list[str]] | None:
    """The model (probabilities) and display names the CLIs tag with; None after printing the one-line error."""
    try:
        # Trained checkpoints record pooling "logit" (raw logits for the loss); tagging reports probabilities.
        model = load_checkpoint(checkpoint, trust=trust, pooling="mean")
        return model, class_names(model.num_classes, labels, checkpoint)
    except (CheckpointError, ValueError, OSError) as error:
        print(f"error: checkpoint {checkpoint}: {error}", file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    loaded = load_tagger(args.checkpoint, args.labels, args.trust_checkpoint)
    if loaded is None:
        return 2
    model, names = loaded
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
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
