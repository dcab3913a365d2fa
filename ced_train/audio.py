"""Decode any audio file to a mono float32 waveform at 16 kHz, whole (`load_audio`) or streamed in bounded blocks
(`AudioSource.blocks`), with the same samples either way.

soundfile (libsndfile) reads WAV, FLAC, OGG/Vorbis/Opus and MP3 in-process. Containers libsndfile does not read
(m4a/mp4/aac, webm, mkv) go through the `ffmpeg` binary (and `ffprobe` for the stream's rate and channels) when it is
on PATH; without it they fail with a reason that says so, which data_prep turns into a skip line instead of a crash.
Streaming reads the file in source blocks, downmixes each by the mean over channels and resamples with soxr's stream
resampler, whose output equals its one-shot resampler's bit for bit: memory is bounded by the block, not the file.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
import soxr

SAMPLE_RATE = 16000
# 'HQ' is soxr's default: pass band to 0.95 x Nyquist with 144 dB attenuation, far beyond what 16-bit storage keeps.
RESAMPLE_QUALITY = "HQ"
# Extensions that only ffmpeg decodes on a stock libsndfile; anything else that soundfile rejects is unreadable.
FFMPEG_EXTENSIONS = frozenset({".m4a", ".mp4", ".aac", ".opus", ".webm", ".mkv", ".mka"})
SOUNDFILE_EXTENSIONS = frozenset({".wav", ".flac", ".ogg", ".oga", ".mp3", ".aif", ".aiff"})
AUDIO_EXTENSIONS = SOUNDFILE_EXTENSIONS | FFMPEG_EXTENSIONS
FFMPEG_TIMEOUT_S = 600  # without output for this long, ffmpeg is taken to hang
DEFAULT_BLOCK_SAMPLES = 60 * SAMPLE_RATE


class AudioDecodeError(Exception):
    """A file that could not be decoded; `str()` names the file and the reason."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason

    def __reduce__(self):  # keep both fields when the error crosses a process boundary
        return (type(self), (self.path, self.reason))


@dataclass(frozen=True)
class DecodedAudio:
    """`waveform`: (samples,) float32 mono at the requested rate; `source_*`: what the file held."""

    waveform: np.ndarray
    source_rate: int
    source_channels: int


@dataclass(frozen=True)
class AudioSource:
    """An audio file probed for its first audio stream: `source_rate` in Hz, `source_channels`, `duration_s` (None
    when the container does not say), and whether ffmpeg decodes it. Make one with `AudioSource.open`."""

    path: Path
    source_rate: int
    source_channels: int
    duration_s: float | None
    via_ffmpeg: bool

    @classmethod
    def open(cls, path: str | Path) -> "AudioSource":
        """Probe `path` (its header only).

        Raises:
            AudioDecodeError: missing, unreadable, or needs ffmpeg/ffprobe that is not installed.
        """
        path = Path(path)
        if not path.is_file():
            raise AudioDecodeError(path, "no such file")
        try:
            info = soundfile.info(path)
        except (soundfile.SoundFileError, RuntimeError, ValueError, EOFError, OSError) as error:
            if path.suffix.lower() not in FFMPEG_EXTENSIONS:
                raise AudioDecodeError(path, f"unreadable by soundfile ({error})") from None
            return cls(path, *_probe_with_ffprobe(path), via_ffmpeg=True)
        if info.samplerate <= 0 or info.channels <= 0:
            raise AudioDecodeError(path, f"header claims {info.samplerate} Hz and {info.channels} channels")
        return cls(path, int(info.samplerate), int(info.channels), info.frames / info.samplerate, via_ffmpeg=False)

    def blocks(self, block_samples: int = DEFAULT_BLOCK_SAMPLES, sample_rate: int = SAMPLE_RATE,
               start_s: float = 0.0, stop_s: float | None = None) -> Iterator[np.ndarray]:
        """The audio of `[start_s, stop_s)` (default: all) as `(block_samples,)` float32 mono blocks at
        `sample_rate`, the last one shorter (none for an empty file); concatenated they equal `load_audio`'s waveform
        of that span.

        Raises:
            AudioDecodeError: a read fails midway or yields NaN/inf.
        """
        if block_samples < 1:
            raise ValueError(f"block_samples must be >= 1, got {block_samples}")
        source_block = max(1, math.ceil(block_samples * self.source_rate / sample_rate))
        reader = _ffmpeg_frames if self.via_ffmpeg else _soundfile_frames
        yield from mono_blocks(reader(self, source_block, start_s, stop_s), self.source_rate, block_samples,
                               sample_rate, self.path)


def mono_blocks(frames: Iterable[np.ndarray], source_rate: int, block_samples: int, sample_rate: int = SAMPLE_RATE,
                name: str | Path = "audio") -> Iterator[np.ndarray]:
    """`(n, channels)` float32 frames at `source_rate` Hz, in order → `(block_samples,)` float32 mono blocks at
    `sample_rate`, the last one shorter: downmixed by the mean over channels and resampled with soxr's stream
    resampler (equal to its one-shot output whatever the frames' sizes). The rule of every decoder here: files,
    pipes and live inputs.

    Raises:
        AudioDecodeError: `name`'s samples hold NaN or inf.
    """
    resampler = None if source_rate == sample_rate else soxr.ResampleStream(
        source_rate, sample_rate, 1, dtype="float32", quality=RESAMPLE_QUALITY)
    pending: list[np.ndarray] = []
    held = 0
    for block in frames:
        if not np.isfinite(block).all():
            raise AudioDecodeError(name, "decoded samples contain NaN or inf")
        mono = block.mean(axis=1, dtype=np.float32) if block.shape[1] > 1 else block[:, 0]
        out = mono if resampler is None else resampler.resample_chunk(mono, last=False)
        pending.append(np.asarray(out, dtype=np.float32))
        held += len(out)
        while held >= block_samples:
            chunk, pending, held = _take(pending, block_samples)
            yield chunk
    if resampler is not None:
        pending.append(np.asarray(resampler.resample_chunk(np.zeros(0, np.float32), last=True), np.float32))
        held += len(pending[-1])
    while held > 0:
        chunk, pending, held = _take(pending, min(block_samples, held))
        yield chunk


def _take(pending: list[np.ndarray], count: int) -> tuple[np.ndarray, list[np.ndarray], int]:
    """The first `count` samples of the queued arrays, and what is left (as arrays and a sample count)."""
    joined = np.concatenate(pending) if len(pending) > 1 else pending[0]
    rest = joined[count:]
    return np.ascontiguousarray(joined[:count]), ([rest] if len(rest) else []), len(rest)


def _soundfile_frames(source: AudioSource, block: int, start_s: float, stop_s: float | None) -> Iterator[np.ndarray]:
    try:
        with soundfile.SoundFile(source.path) as handle:
            first = round(start_s * source.source_rate)
            if first:
                handle.seek(min(first, handle.frames))
            remaining = None if stop_s is None else max(0, round(stop_s * source.source_rate) - first)
            while remaining is None or remaining > 0:
                frames = handle.read(block if remaining is None else min(block, remaining), dtype="float32",
                                     always_2d=True)
                if not len(frames):
                    return
                if remaining is not None:
                    remaining -= len(frames)
                yield frames
    except (soundfile.SoundFileError, RuntimeError, ValueError, EOFError, OSError) as error:
        raise AudioDecodeError(source.path, f"unreadable by soundfile ({error})") from None


def _probe_with_ffprobe(path: Path) -> tuple[int, int, float | None]:
    """(rate, channels, duration or None) of the first audio stream, from ffprobe."""
    ffprobe = shutil.which("ffprobe")
    if ffprobe is None or shutil.which("ffmpeg") is None:
        raise AudioDecodeError(path, f"soundfile cannot read {path.suffix} files and ffmpeg not found on PATH")
    command = [ffprobe, "-v", "error", "-select_streams", "a:0", "-show_entries",
               "stream=sample_rate,channels:format=duration", "-of", "json", str(path)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=FFMPEG_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise AudioDecodeError(path, f"ffprobe did not finish within {FFMPEG_TIMEOUT_S} s") from None
    try:
        probed = json.loads(result.stdout or "{}")
        stream = probed["streams"][0]
        rate, channels = int(stream["sample_rate"]), int(stream["channels"])
    except (ValueError, KeyError, IndexError, TypeError):
        detail = (result.stderr.strip().splitlines() or ["no audio stream"])[-1].replace(f"{path}: ", "")
        raise AudioDecodeError(path, f"ffmpeg failed to find an audio stream (ffprobe: {detail})") from None
    if rate <= 0 or channels <= 0:
        raise AudioDecodeError(path, f"ffprobe reports {rate} Hz and {channels} channels")
    duration = probed.get("format", {}).get("duration")
    return rate, channels, float(duration) if duration not in (None, "N/A") else None


def _ffmpeg_frames(source: AudioSource, block: int, start_s: float, stop_s: float | None) -> Iterator[np.ndarray]:
    """Let ffmpeg write raw float32 frames at the source rate and channel count to a pipe, and read them in blocks."""
    span = [] if stop_s is None else ["-t", f"{max(0.0, stop_s - start_s):.6f}"]
    command = [shutil.which("ffmpeg") or "ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error",
               *(["-ss", f"{start_s:.6f}"] if start_s else []), "-i", str(source.path), *span,
               "-map", "0:a:0", "-c:a", "pcm_f32le", "-f", "f32le", "-"]
    frame_bytes = 4 * source.source_channels
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        timed_out = threading.Event()
        try:
            while True:
                watchdog = threading.Timer(FFMPEG_TIMEOUT_S, lambda: (timed_out.set(), process.kill()))
                watchdog.start()
                try:
                    data = process.stdout.read(block * frame_bytes)
                finally:
                    watchdog.cancel()
                if timed_out.is_set():
                    raise AudioDecodeError(source.path, f"ffmpeg gave no output for {FFMPEG_TIMEOUT_S} s")
                if len(data) < frame_bytes:
                    break
                usable = len(data) - len(data) % frame_bytes
                yield np.frombuffer(data[:usable], dtype="<f4").reshape(-1, source.source_channels)
        finally:
            if process.poll() is None:
                process.kill()
            stderr = process.stderr.read().decode(errors="replace")
            process.wait()
    if process.returncode != 0:
        detail = (stderr.strip().splitlines() or ["no message"])[-1]
        raise AudioDecodeError(source.path, f"ffmpeg failed (exit {process.returncode}): {detail}")


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> DecodedAudio:
    """Decode `path` whole: downmix by the mean over channels, resample to `sample_rate` with soxr.

    The duration is kept as it is (no padding or trimming). A file with no frames decodes to an empty waveform; callers
    decide whether that is an error. Holds the whole file in memory: long recordings go through `AudioSource.blocks`.

    Raises:
        AudioDecodeError: the file is missing, unreadable, needs ffmpeg that is not installed, or holds NaN/inf.
    """
    source = AudioSource.open(path)
    blocks = list(source.blocks(sample_rate=sample_rate))
    waveform = np.concatenate(blocks) if blocks else np.zeros(0, np.float32)
    return DecodedAudio(waveform, source.source_rate, source.source_channels)
