"""Data throughput, clips per second per core, measured in one run on the synthetic AudioSet-format dataset:

  (a) sharding: data_prep's decode + resample + FLAC encode + tar write, one decoding process
  (b) reading shards: iter_shard (sequential tar read + FLAC decode), and ClipStream (shuffle buffer)
against
  (w) reading the same clips stored as separate 16 kHz 16-bit WAV files (soundfile), and
  (s) decoding the original source files on the fly (mixed formats and rates, load_audio with resampling),
printed as ratios. All reads are from the page cache (files were just written): this measures CPU cost, not disk.

    python benchmarks/data_throughput.py [--clips 200]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import soundfile

from ced_train.audio import SAMPLE_RATE, AudioDecodeError, load_audio
from ced_train.data import ClipStream, iter_shard, read_manifest
from ced_train.labels import load_class_labels
from data_prep.audioset import AudioIndex, read_segments
from data_prep.sharding import build_shards
from data_prep.synthetic import generate


def best_rate(count_clips: Callable[[], int], repeats: int = 3) -> float:
    """Clips per second of the fastest of `repeats` runs (the least disturbed by other processes)."""
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        count = count_clips()
        rates.append(count / (time.perf_counter() - start))
    return max(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=200, help="synthetic train rows to generate (default 200)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ced_bench_") as tmp:
        root = Path(tmp)
        generate(root / "source", train=args.clips, eval_=0, seed=0, workers=2)
        classes = load_class_labels(root / "source" / "class_labels_indices.csv")
        audio_dir = root / "source" / "audio" / "balanced_train"
        inputs = read_segments([root / "source" / "balanced_train_segments.csv"], AudioIndex(audio_dir), classes)

        start = time.perf_counter()
        report = build_shards(inputs, root / "shards", classes, tool="benchmark", labelled=True,
                              samples_per_shard=64, workers=1, progress=False)
        shard_rate = report.clips_decoded / (time.perf_counter() - start)
        manifest = read_manifest(root / "shards")

        wav_dir = root / "wav"
        wav_dir.mkdir()
        for shard in manifest.shards:
            for clip in iter_shard(shard.path):
                soundfile.write(wav_dir / f"{clip.key}.wav", clip.waveform, SAMPLE_RATE, subtype="PCM_16")
        wav_paths = sorted(wav_dir.iterdir())
        source_paths = [row.path for row in inputs if hasattr(row, "path")]

        def read_wavs() -> int:
            for path in wav_paths:
                soundfile.read(path, dtype="float32")
            return len(wav_paths)

        def read_shards() -> int:
            return sum(1 for shard in manifest.shards for _ in iter_shard(shard.path))

        def stream_shards() -> int:
            return sum(1 for _ in ClipStream(manifest, shuffle_buffer=100, seed=0))

        def decode_sources() -> int:
            for path in source_paths:
                try:
                    load_audio(path)
                except AudioDecodeError:  # the corrupt files cost a failed open, as they would in training
                    pass
            return len(source_paths)

        wav_rate = best_rate(read_wavs)
        results = {
            "(a) sharding (decode+resample+FLAC+tar)": shard_rate,
            "(b) iter_shard (tar + FLAC decode)": best_rate(read_shards),
            "(b) ClipStream (buffer 100)": best_rate(stream_shards),
            "(w) separate 16 kHz WAV files": wav_rate,
            "(s) source files via load_audio": best_rate(decode_sources, repeats=1),
        }
        hours = manifest.total_hours
        shard_mb = sum(s.bytes for s in manifest.shards) / 1e6
        wav_mb = sum(p.stat().st_size for p in wav_paths) / 1e6

    print(f"{manifest.num_samples} clips, {hours * 3600 / manifest.num_samples:.1f} s average, "
          f"{len(manifest.shards)} shards; one process each (clips/s per core)")
    width = max(map(len, results))
    for name, rate in results.items():
        print(f"  {name:<{width}}  {rate:8.1f} clips/s  {rate / wav_rate:6.2f} x WAV")
    print(f"  storage: shards {shard_mb:.1f} MB (FLAC) vs WAV {wav_mb:.1f} MB: {shard_mb / wav_mb:.2f} x")


if __name__ == "__main__":
    main()
