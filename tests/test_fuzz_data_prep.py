"""data_prep against a few hundred broken files: every row accounted for with a reason, no crash, no hang, and
memory bounded however absurd a header's claims (the run gets a 3 GiB address-space limit)."""

from __future__ import annotations

import io
import resource
import struct
import subprocess
import sys

import numpy as np
import soundfile

from ced_train.data import read_manifest, read_skipped

GOOD_FORMATS = {"wav": "WAV", "flac": "FLAC", "ogg": "OGG", "mp3": "MP3"}


def encoded(fmt: str, seconds: float = 0.5, rate: int = 16000, channels: int = 1, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    frames = (0.2 * rng.standard_normal((int(seconds * rate), channels))).astype(np.float32)
    buffer = io.BytesIO()
    soundfile.write(buffer, frames, rate, format=GOOD_FORMATS[fmt])
    return buffer.getvalue()


def wav_header(channels: int, rate: int, bits: int, data_bytes: int) -> bytes:
    block = channels * bits // 8
    return (b"RIFF" + struct.pack("<I", (36 + data_bytes) & 0xFFFFFFFF) + b"WAVEfmt " +
            struct.pack("<IHHIIHH", 16, 1, channels, rate, (rate * block) & 0xFFFFFFFF, block & 0xFFFF, bits) +
            b"data" + struct.pack("<I", data_bytes & 0xFFFFFFFF))


def bad_files() -> dict[str, bytes]:
    rng = np.random.default_rng(1)
    files: dict[str, bytes] = {}
    for ext in GOOD_FORMATS:
        whole = encoded(ext)
        for cut in list(range(0, 64, 3)) + [len(whole) // 4, len(whole) // 2]:
            files[f"truncated/{ext}_{cut:05d}.{ext}"] = whole[:cut]
        for i in range(12):
            files[f"random/{ext}_{i:02d}.{ext}"] = rng.integers(0, 256, size=int(rng.integers(1, 4096)),
                                                                 dtype=np.uint8).tobytes()
        flipped = bytearray(whole)
        for i in range(10):
            position = int(rng.integers(0, len(flipped)))
            flipped[position] ^= 0xFF
            files[f"flipped/{ext}_{i:02d}.{ext}"] = bytes(flipped)
    pcm = rng.integers(-1000, 1000, size=800, dtype=np.int16).tobytes()
    for name, header in {
        "huge_length": wav_header(1, 16000, 16, 0xFFFFFFF0),
        "many_channels": wav_header(65535, 16000, 16, len(pcm)),
        "zero_channels": wav_header(0, 16000, 16, len(pcm)),
        "zero_rate": wav_header(1, 0, 16, len(pcm)),
        "absurd_rate": wav_header(1, 0xFFFFFFFF, 16, len(pcm)),
        "odd_bits": wav_header(1, 16000, 13, len(pcm)),
    }.items():
        files[f"headers/{name}.wav"] = header + pcm
    for i, ext in enumerate(("m4a", "webm", "opus", "mkv")):  # the ffmpeg path, where it is installed
        files[f"random/{ext}_{i}.{ext}"] = rng.integers(0, 256, size=2048, dtype=np.uint8).tobytes()
    files["empty/zero.wav"] = b""
    files["empty/zero.flac"] = b""
    files["empty/silence_header_only.wav"] = wav_header(1, 16000, 16, 0)
    return files


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))


def test_every_broken_file_is_a_skip_with_a_reason_and_the_good_ones_are_written(tmp_path):
    audio = tmp_path / "audio"
    files = bad_files()
    for i, ext in enumerate(GOOD_FORMATS):
        files[f"good/{ext}_{i}.{ext}"] = encoded(ext, seconds=1.0, channels=1 + i % 2, seed=10 + i)
    for name, data in files.items():
        (audio / name).parent.mkdir(parents=True, exist_ok=True)
        (audio / name).write_bytes(data)
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "data_prep.folder", "--audio-dir", str(audio), "--out", str(out),
                             "--workers", "2", "--no-progress"], capture_output=True, text=True, timeout=300,
                            preexec_fn=_limit_memory)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest, skipped = read_manifest(out), read_skipped(out)
    written = {key for shard in manifest.shards for key in shard.keys}
    assert manifest.num_rows == len(files) == len(written) + len(skipped)
    assert {f"good__{ext}_{i}" for i, ext in enumerate(GOOD_FORMATS)} <= written
    assert all(skip.reason and skip.detail for skip in skipped)
    skipped_keys = {skip.key for skip in skipped}
    assert sum(key.startswith("empty__zero") for key in skipped_keys) == 2  # the two zero-byte files
    print(f"{len(files)} files: {len(written)} written, {len(skipped)} skipped")
