"""CPU latency of CED-Tiny on one 10 s clip against MobileNetV3-Large and against eager (non-fused) attention.

    python benchmarks/model_speed.py [--repeats 30] [--threads N]

All three run in one process on the same input: CED-Tiny with timm's fused scaled-dot-product attention, the same
weights with the plain softmax(QK^T)V path, and timm's `mobilenetv3_large_100` (1 input channel, 527 classes) on the
same 64 x 1001 log-mel spectrogram (front end included in every timing). Prints median latencies and the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

from ced_train.models import create_model


def median_latency_ms(fn, repeats: int, warmup: int = 3) -> float:
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    waveform = torch.randn(1, 160000) * 0.1
    ced = create_model("ced_tiny").eval()
    ced_eager = create_model("ced_tiny").eval()
    ced_eager.load_state_dict(ced.state_dict())
    for block in ced_eager.blocks:
        block.attn.fused_attn = False
    mobilenet = timm.create_model("mobilenetv3_large_100", in_chans=1, num_classes=527).eval()
    front_end = ced.front_end

    def run_mobilenet():
        return mobilenet(front_end(waveform).unsqueeze(1)).sigmoid()

    with torch.inference_mode():
        torch.testing.assert_close(ced(waveform), ced_eager(waveform), rtol=0, atol=1e-5)
    latency = {
        "ced_tiny (fused attention)": median_latency_ms(lambda: ced(waveform), args.repeats),
        "ced_tiny (eager attention)": median_latency_ms(lambda: ced_eager(waveform), args.repeats),
        "mobilenetv3_large_100": median_latency_ms(run_mobilenet, args.repeats),
    }
    params = {
        "ced_tiny (fused attention)": sum(p.numel() for p in ced.parameters()),
        "ced_tiny (eager attention)": sum(p.numel() for p in ced_eager.parameters()),
        "mobilenetv3_large_100": sum(p.numel() for p in mobilenet.parameters()),
    }
    print(f"CPU latency, one 10 s clip (batch 1, {args.threads} threads, median of {args.repeats}, torch {torch.__version__})")
    for name, ms in latency.items():
        print(f"  {name:28s} {ms:8.1f} ms   {params[name] / 1e6:5.2f} M params")
    fused = latency["ced_tiny (fused attention)"]
    print(f"ratio mobilenetv3_large_100 / ced_tiny latency:    {latency['mobilenetv3_large_100'] / fused:.2f}x")
    print(f"ratio eager / fused attention latency (ced_tiny):  {latency['ced_tiny (eager attention)'] / fused:.2f}x")


if __name__ == "__main__":
    main()
