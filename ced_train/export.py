"""Export a CED checkpoint to ONNX: waveform → probabilities, with dynamic batch and time axes.

    python -m ced_train.export --checkpoint PATH --out model.onnx [--opset 18]

The graph takes `waveform (batch, samples)` float32 at 16 kHz and returns `probs (batch, classes)`; inputs longer than
the positional table are chunked inside the graph exactly as in torch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ced_train.audio import SAMPLE_RATE
from ced_train.models import CEDModel, CheckpointError, load_checkpoint

MAX_SECONDS = 3600


def export_onnx(model: CEDModel, out: str | Path, opset: int = 18) -> Path:
    """Write `model` (eval mode, probabilities) to `out` via the dynamo exporter; returns the path written."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    # Batch 2 in the example: a batch of 1 would be specialised to a constant by torch.export.
    example = torch.zeros(2, 3 * SAMPLE_RATE)
    dynamic = {
        0: torch.export.Dim("batch", min=1, max=4096),
        1: torch.export.Dim("samples", min=model.front_end.n_fft, max=MAX_SECONDS * SAMPLE_RATE),
    }
    torch.onnx.export(
        model,
        (example,),
        str(out),
        dynamo=True,
        opset_version=opset,
        input_names=["waveform"],
        output_names=["probs"],
        dynamic_shapes={"waveform": dynamic},
        verbose=False,
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ced_train.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="official CED .pt, state dict or ced-train .ckpt")
    parser.add_argument("--out", required=True, help="ONNX file to write")
    parser.add_argument("--opset", type=int, default=18)
    args = parser.parse_args(argv)
    try:
        model = load_checkpoint(args.checkpoint, pooling="mean")
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    path = export_onnx(model, args.out, args.opset)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB): waveform (batch, samples) @16 kHz -> probs (batch, {model.num_classes})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
