"""Decode any audio file to a mono float32 waveform at 16 kHz.

soundfile (libsndfile) reads WAV, FLAC, OGG/Vorbis/Opus and MP3 in-process. Containers libsndfile does not read
(m4a/mp4/aac, webm, mkv) go through the `ffmpeg` binary when it is on PATH; without it they fail with a reason that says
so, which data_prep turns into a skip line instead of a crash.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
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
FFMPEG_TIMEOUT_S = 600


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


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> DecodedAudio:
    """Decode `path`, downmix by the mean over channels and resample to `sample_rate` with soxr.

    The duration is kept as it is (no padding or trimming). A file with no frames decodes to an empty waveform; callers
    decide whether that is an error.

    Raises:
        AudioDecodeError: the file is missing, unreadable, needs ffmpeg that is not installed, or holds NaN/inf.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioDecodeError(path, "no such file")
    try:
        frames, source_rate = soundfile.read(path, dtype="float32", always_2d=True)
    except (soundfile.SoundFileError, RuntimeError, ValueError, EOFError, OSError) as error:
        if path.suffix.lower() not in FFMPEG_EXTENSIONS:
            raise AudioDecodeError(path, f"unreadable by soundfile ({error})") from None
        frames, source_rate = _decode_with_ffmpeg(path)
    if not np.isfinite(frames).all():
        raise AudioDecodeError(path, "decoded samples contain NaN or inf")
    mono = frames.mean(axis=1, dtype=np.float32) if frames.shape[1] > 1 else frames[:, 0]
    if source_rate != sample_rate and mono.size:
        mono = soxr.resample(mono, source_rate, sample_rate, quality=RESAMPLE_QUALITY)
    return DecodedAudio(np.ascontiguousarray(mono, dtype=np.float32), int(source_rate), int(frames.shape[1]))


def _decode_with_ffmpeg(path: Path) -> tuple[np.ndarray, int]:
    """Let ffmpeg convert to float WAV at the source rate and channel count, then read that with soundfile.

    A temporary file rather than a pipe: a WAV written to a pipe has no valid length field.
    """
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise AudioDecodeError(path, f"soundfile cannot read {path.suffix} files and ffmpeg not found on PATH")
    with tempfile.TemporaryDirectory(prefix="ced_ffmpeg_") as tmp:
        wav_path = Path(tmp) / "decoded.wav"
        command = [ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", "-i", str(path),
                   "-map", "0:a:0", "-c:a", "pcm_f32le", "-f", "wav", str(wav_path)]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=FFMPEG_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise AudioDecodeError(path, f"ffmpeg did not finish within {FFMPEG_TIMEOUT_S} s") from None
        if result.returncode != 0 or not wav_path.is_file():
            detail = (result.stderr.strip().splitlines() or ["no message"])[-1]
            raise AudioDecodeError(path, f"ffmpeg failed (exit {result.returncode}): {detail}")
        try:
            frames, source_rate = soundfile.read(wav_path, dtype="float32", always_2d=True)
        except (soundfile.SoundFileError, RuntimeError) as error:
            raise AudioDecodeError(path, f"ffmpeg wrote audio that soundfile cannot read ({error})") from None
    return frames, source_rate
