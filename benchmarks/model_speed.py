"""CPU latency of CED-Tiny and MobileNetV3-Large on one 10 s clip, each on the same runtimes: PyTorch eager fp32,
ONNX Runtime fp32 and ONNX Runtime int8 (`python -m ced_train.export --quantize int8`).

    python benchmarks/model_speed.py [--checkpoint STUDENT.ckpt] [--repeats 30] [--threads 2]

Both models take the waveform and include the same log-mel front end (ced-train's, with the STFT as a convolution in
the ONNX graphs); MobileNetV3-Large is timm's `mobilenetv3_large_100` with one input channel and 527 outputs. Latency
does not depend on the weights; the int8 drift does, so pass a trained CED-Tiny (the demo's student:
runs/artifacts/tiny_distill/student/student.ckpt, or tests/fixtures/demo_student) to measure it on one. Prints median
latencies, the ratios the deployment targets are stated in, and CED-Tiny's maximum |int8 − fp32| probability on 16
noise and tone clips.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import timm
import torch
from torch import nn

from ced_train.export import export_onnx
from ced_train.models import LogMelFrontEnd, create_model, load_checkpoint


class MobileNetTagger(nn.Module):
    """timm's full MobileNetV3-Large classifier on ced-train's front end: waveform → 527 probabilities."""

    def __init__(self) -> None:
        super().__init__()
        self.front_end = LogMelFrontEnd()
        self.net = timm.create_model("mobilenetv3_large_100", in_chans=1, num_classes=527)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return self.net(self.front_end(waveform).unsqueeze(1)).sigmoid()


def median_ms(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def drift_clips() -> np.ndarray:
    """16 clips of 10 s: noise at four levels and tones, (16, 160000) float32."""
    rng = np.random.default_rng(0)
    t = np.arange(160000) / 16000
    noise = [level * rng.standard_normal(160000) for level in (0.003, 0.03, 0.1, 0.3) for _ in range(2)]
    tones = [0.2 * np.sin(2 * np.pi * f * t) + 0.01 * rng.standard_normal(160000) for f in (110, 440, 1000, 3000,
                                                                                              5000, 7000, 250, 2000)]
    return np.stack(noise + tones).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None, help="a trained CED-Tiny (default: random weights)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1

    models = {
        "ced_tiny": load_checkpoint(args.checkpoint, pooling="mean") if args.checkpoint else create_model("ced_tiny"),
        "mobilenetv3_large": MobileNetTagger(),
    }
    waveform = torch.randn(1, 160000) * 0.1
    clips = drift_clips()
    latency: dict[tuple[str, str], float] = {}
    drift = 0.0
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        for name, model in models.items():
            model.eval()
            latency[name, "eager fp32"] = median_ms(lambda m=model: m(waveform), args.repeats)
            outputs = {}
            for kind in ("fp32", "int8"):
                path = export_onnx(model, Path(tmp) / f"{name}_{kind}.onnx",
                                   quantize="int8" if kind == "int8" else "none")
                session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                feed = {"waveform": waveform.numpy()}
                latency[name, f"onnx {kind}"] = median_ms(lambda s=session, f=feed: s.run(None, f), args.repeats)
                outputs[kind] = np.concatenate([session.run(None, {"waveform": clip[None]})[0] for clip in clips])
            if name == "ced_tiny":  # MobileNetV3's random weights say nothing about its drift
                drift = float(np.abs(outputs["int8"] - outputs["fp32"]).max())

    runtimes = ("eager fp32", "onnx fp32", "onnx int8")
    print(f"CPU latency, one 10 s clip, batch 1, {args.threads} threads, median of {args.repeats} "
          f"(torch {torch.__version__}, onnxruntime {onnxruntime.__version__}); CED-Tiny weights: "
          f"{args.checkpoint or 'random'}")
    print(f"  {'runtime':12s} {'ced_tiny':>10s} {'mobilenetv3_large':>18s} {'ratio':>7s}")
    for runtime in runtimes:
        ced, mobilenet = latency["ced_tiny", runtime], latency["mobilenetv3_large", runtime]
        print(f"  {runtime:12s} {ced:8.1f} ms {mobilenet:16.1f} ms {ced / mobilenet:6.2f}x")
    fastest = min(runtimes, key=lambda r: latency["ced_tiny", r])
    print(f"fastest ced_tiny ({fastest}) / mobilenetv3_large eager fp32: "
          f"{latency['ced_tiny', fastest] / latency['mobilenetv3_large', 'eager fp32']:.2f}x (target <= 0.75)")
    print(f"worst shared-runtime ratio ced_tiny / mobilenetv3_large: "
          f"{max(latency['ced_tiny', r] / latency['mobilenetv3_large', r] for r in runtimes):.2f}x (target <= 1.3)")
    print(f"max |int8 - fp32| probability, ced_tiny, {len(clips)} clips: {drift:.5f} (target <= 0.01)")


if __name__ == "__main__":
    main()
