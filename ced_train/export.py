"""Export a CED checkpoint: to ONNX (waveform → probabilities, dynamic batch and time axes; optionally int8) or to
the Hugging Face layout (`config.json` + `model.safetensors`, the names of `mispeech/ced-*`).

    python -m ced_train.export --checkpoint PATH --out model.onnx [--quantize int8] [--opset 18]
    python -m ced_train.export --checkpoint PATH --format hf --out DIR [--labels FILE_OR_SHARD_DIR]

The ONNX graph takes `waveform (batch, samples)` float32 at 16 kHz and returns `probs (batch, classes)`; inputs longer
than the positional table are chunked inside the graph exactly as in torch; the STFT is a convolution with the
windowed DFT basis (ONNX Runtime's own STFT kernel is slow). `--quantize int8` applies ONNX Runtime's
dynamic quantisation (int8 weights, activations quantised per batch at run time) to the transformer's and head's
weight matrices; the front end (STFT and mel filterbank, whose power values span 12 orders of magnitude) and the
attention products stay float32. An HF directory gets `id2label` from `--labels` (a label file or the shard directory
the model was trained on), else from the checkpoint's own names, else AudioSet's for 527 outputs.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
from pathlib import Path

import torch

from ced_train.audio import SAMPLE_RATE
from ced_train.extras import MissingExtra, require
from ced_train.models import CEDModel, CheckpointError, load_checkpoint

MAX_SECONDS = 3600
QUANTIZE = ("none", "int8")


def require_onnx_export(quantize: str) -> None:
    """What `export_onnx` imports: onnx and onnxscript (the dynamo exporter imports them inside `torch.onnx.export`),
    and for int8 ONNX Runtime's quantiser; raises MissingExtra naming the `export` extra."""
    int8 = ("onnxruntime", "onnxruntime.quantization") if quantize == "int8" else ()
    require("export", "onnx", "onnxscript", *int8,
            feature="ONNX export" + (" with --quantize int8" if quantize == "int8" else ""))


def export_onnx(model: torch.nn.Module, out: str | Path, opset: int = 18, quantize: str = "none") -> Path:
    """Write `model` (waveform → probabilities, with a `LogMelFrontEnd` as `model.front_end`; a CED or CNN tagger) to
    `out` via the dynamo exporter, int8-quantised when `quantize` is "int8"; returns the path written. The graph's
    STFT is a convolution (`LogMelFrontEnd.stft_as_convolution`); `model` itself is left unchanged. Files are made
    in a temporary directory beside `out` and moved into place when complete (`out`, and `out.data` where the
    exporter stores the weights apart), so a failed export leaves nothing behind; without the `export` extra it
    raises MissingExtra before writing anything."""
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {QUANTIZE}, got {quantize!r}")
    require_onnx_export(quantize)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(model).eval()
    model.front_end.stft_as_convolution()
    # Batch 2 in the example: a batch of 1 would be specialised to a constant by torch.export.
    example = torch.zeros(2, 3 * SAMPLE_RATE)
    dynamic = {
        0: torch.export.Dim("batch", min=1, max=4096),
        1: torch.export.Dim("samples", min=model.front_end.n_fft, max=MAX_SECONDS * SAMPLE_RATE),
    }
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        staged = Path(tmp) / out.name
        fp32 = staged if quantize == "none" else Path(tmp) / "fp32" / "fp32.onnx"  # intermediates apart
        fp32.parent.mkdir(exist_ok=True)
        torch.onnx.export(model, (example,), str(fp32), dynamo=True, opset_version=opset, input_names=["waveform"],
                          output_names=["probs"], dynamic_shapes={"waveform": dynamic}, verbose=False)
        if quantize == "int8":
            quantize_int8(fp32, staged)
        for path in sorted(p for p in Path(tmp).glob(f"{out.name}*") if p.is_file()):  # graph + external data
            os.replace(path, out.parent / path.name)
    return out


def quantize_int8(fp32: Path, out: Path) -> None:
    """ONNX Runtime dynamic int8 quantisation of the MatMul/Gemm nodes whose weight is a stored tensor other than
    the front end's mel filterbank (`export` docstring)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(fp32))
    # Intermediate shapes are re-inferred by the quantiser; some exporter releases record ones that onnx's shape
    # inference then contradicts (the head's Gemm under torch 2.11).
    del model.graph.value_info[:]
    weights = {init.name for init in model.graph.initializer}
    excluded = [node.name for node in model.graph.node if node.op_type in ("MatMul", "Gemm")
                and (not set(node.input[1:2]) & weights or node.input[1].startswith("front_end."))]
    plain = fp32.with_name("plain.onnx")
    onnx.save(model, str(plain))
    quantize_dynamic(plain, out, op_types_to_quantize=["MatMul", "Gemm"], nodes_to_exclude=excluded,
                     weight_type=QuantType.QInt8, per_channel=True)


class OnnxTagger:
    """An exported ONNX model as a tagger, for `tag` and `serve`: `(batch, samples)` float32 torch tensor at 16 kHz →
    `(batch, classes)` float32 probabilities, on ONNX Runtime's CPU provider with `threads` intra-op threads (None:
    its default). Without the `export` extra it raises MissingExtra."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        require("export", "onnxruntime", feature="tagging with an ONNX model")
        import onnxruntime

        options = onnxruntime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own untyped errors for missing or invalid files
            raise CheckpointError(f"{path}: not a loadable ONNX model ({str(error).splitlines()[0]})") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if [i.name for i in inputs] != ["waveform"] or not isinstance(outputs[0].shape[-1], int):
            raise CheckpointError(f"{path}: expected an export of this project (input 'waveform', output "
                                  f"(batch, classes)), found inputs {[i.name for i in inputs]}")
        self.num_classes = outputs[0].shape[-1]

    def __call__(self, waveform: torch.Tensor) -> torch.Tensor:
        (probs,) = self.session.run(None, {"waveform": waveform.detach().float().contiguous().numpy()})
        return torch.from_numpy(probs)

    def eval(self) -> "OnnxTagger":
        return self


def hf_class_names(model: CEDModel, labels: str | None, checkpoint: str) -> list[str]:
    """`id2label` names for `export --format hf` (module docstring)."""
    from ced_train.tag import known_class_names

    names = known_class_names(model.num_classes, labels, checkpoint)
    if names is None:
        raise ValueError(f"the model has {model.num_classes} outputs and no names: pass --labels (the label file or "
                         "the shard directory it was trained on)")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ced_train.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="official CED .pt, state dict, HF-layout directory or ced-train .ckpt")
    parser.add_argument("--out", required=True, help="ONNX file (--format onnx) or directory (--format hf) to write")
    parser.add_argument("--format", choices=("onnx", "hf"), default="onnx")
    parser.add_argument("--quantize", choices=QUANTIZE, default="none", help="ONNX only: int8 dynamic quantisation")
    parser.add_argument("--labels", default=None, help="HF only: label file or shard directory for id2label")
    parser.add_argument("--opset", type=int, default=18)
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="fully unpickle a checkpoint the safe loader refuses (runs code in it: trusted files only)")
    args = parser.parse_args(argv)
    if args.format == "hf" and args.quantize != "none":
        parser.error("--quantize applies to --format onnx only")
    try:
        if args.format == "onnx":  # before loading the checkpoint: a missing extra fails at once
            require_onnx_export(args.quantize)
        model = load_checkpoint(args.checkpoint, trust=args.trust_checkpoint, pooling="mean")
        if not isinstance(model, CEDModel):
            raise CheckpointError(f"{args.checkpoint}: export writes CED transformers, this is a "
                                  f"{type(model).__name__}")
        names = hf_class_names(model, args.labels, args.checkpoint) if args.format == "hf" else None
    except (MissingExtra, CheckpointError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from safetensors import SafetensorError

    try:
        if args.format == "hf":
            from ced_train.models.hf import write_hf

            out = write_hf(model, args.out, names)
            print(f"wrote {out}/config.json and {out}/model.safetensors (HF layout, {model.num_classes} classes)")
            return 0
        path = export_onnx(model, args.out, args.opset, args.quantize)
    except (OSError, SafetensorError) as error:  # a full disk, a read-only directory; nothing is left behind
        print(f"error: writing {args.out}: {getattr(error, 'strerror', None) or error}", file=sys.stderr)
        return 2
    kind = "int8" if args.quantize == "int8" else "fp32"
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {kind}): waveform (batch, samples) @16 kHz -> "
          f"probs (batch, {model.num_classes})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
