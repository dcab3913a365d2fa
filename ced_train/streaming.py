"""Live audio for a clip tagger: sources that deliver mono 16 kHz blocks as they arrive, and the sliding windows a
tagger scores every hop, held in a ring buffer (memory does not grow with the stream).

Sources (`open_source`):
    a file        decoded as `ced_train.audio` decodes it (any format it reads), as fast as possible or paced at real
                  time (`realtime=True`)
    "-"           standard input: raw interleaved PCM (s16le, 16 kHz mono unless told otherwise), or a WAV stream
                  (a RIFF header first, as `ffmpeg -f wav -` writes it), whose header says rate, channels and format
    ffmpeg        `ffmpeg_input="-f pulse -i default"` (or alsa, or any input ffmpeg opens): ffmpeg writes a WAV stream
                  at the device's own rate and channel count, read as above

Every source is downmixed by the mean over channels and resampled with soxr's stream resampler, as `data_prep` and
`ced_train.audio` do. What can go wrong with a source is a `SourceError` whose message is one line naming the source
and whose `exit_code` says what happened (`EXIT_CODES`).
"""

from __future__ import annotations

import math
import os
import select
import shlex
import shutil
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from ced_train.audio import SAMPLE_RATE, AudioDecodeError, AudioSource, mono_blocks

# What `tag --stream` exits with: 0 the source ended; the others below.
EXIT_BROKEN, EXIT_CANNOT_START, EXIT_SILENT, EXIT_INTERRUPTED = 1, 2, 3, 130
EXIT_CODES = {
    0: "the source ended",
    EXIT_BROKEN: "the source broke off: it ended mid-sample, stalled, or its decoder failed",
    EXIT_CANNOT_START: "nothing was streamed: a bad option, checkpoint or source header",
    EXIT_SILENT: "the source ended and held only digital silence",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C or SIGTERM)",
}
# PCM sample formats a pipe may carry: numpy dtype and bytes per sample.
PCM_FORMATS = {"s16le": ("<i2", 2), "s32le": ("<i4", 4), "f32le": ("<f4", 4)}
_PCM_SCALE = {"s16le": 1 / 32768, "s32le": 1 / 2147483648, "f32le": 1.0}
MIN_RATE, MAX_RATE, MAX_CHANNELS = 1000, 768000, 64


class SourceError(Exception):
    """A source that cannot start or that broke off; `str()` is one line naming it, `exit_code` is from
    `EXIT_CODES`."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class PcmFormat:
    """Interleaved PCM on a pipe: `rate` in Hz, `channels`, `sample` a key of `PCM_FORMATS`."""

    rate: int
    channels: int
    sample: str

    def check(self, name: str) -> "PcmFormat":
        """Self, after refusing rates, channel counts and formats no audio source has (`SourceError`, exit 2)."""
        if not MIN_RATE <= self.rate <= MAX_RATE:
            raise SourceError(f"{name}: announces {self.rate} Hz; expected {MIN_RATE} to {MAX_RATE}",
                              EXIT_CANNOT_START)
        if not 1 <= self.channels <= MAX_CHANNELS:
            raise SourceError(f"{name}: announces {self.channels} channels; expected 1 to {MAX_CHANNELS}",
                              EXIT_CANNOT_START)
        if self.sample not in PCM_FORMATS:
            raise SourceError(f"{name}: sample format {self.sample!r} is not one of {', '.join(PCM_FORMATS)}",
                              EXIT_CANNOT_START)
        return self

    @property
    def frame_bytes(self) -> int:
        return PCM_FORMATS[self.sample][1] * self.channels


class Source:
    """Blocks of `(samples,)` float32 mono audio at 16 kHz, in stream order (`blocks`); `name` for messages;
    `trailing_bytes` > 0 after a pipe that ended inside a sample frame (those bytes are dropped)."""

    name: str
    trailing_bytes: int = 0

    def blocks(self, block_samples: int) -> Iterator[np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the source holds (a child process); safe to call twice."""


class FileSource(Source):
    """A file decoded in blocks (`AudioSource.blocks`), paced at real time when `realtime`."""

    def __init__(self, path: str, realtime: bool = False) -> None:
        self.name, self.realtime = path, realtime
        try:
            self.audio = AudioSource.open(path)
        except AudioDecodeError as error:
            raise SourceError(str(error), EXIT_CANNOT_START) from None

    def blocks(self, block_samples: int) -> Iterator[np.ndarray]:
        started, delivered = time.monotonic(), 0
        try:
            for block in self.audio.blocks(block_samples):
                delivered += len(block)
                if self.realtime:  # a block is there once the audio it holds has been "played"
                    time.sleep(max(0.0, started + delivered / SAMPLE_RATE - time.monotonic()))
                yield block
        except AudioDecodeError as error:
            raise SourceError(str(error), EXIT_BROKEN) from None


class PipeSource(Source):
    """Interleaved PCM read from a pipe as it arrives; the format from a WAV header when the stream starts with one
    (`wav_header="auto"`: if the first bytes are `RIFF`), else `fmt`. No data for `stall_timeout_s` (None: wait
    forever) is a `SourceError` (exit 1)."""

    def __init__(self, stream: BinaryIO, name: str, fmt: PcmFormat, stall_timeout_s: float | None = 10.0) -> None:
        self.stream, self.name, self.stall_timeout_s = stream, name, stall_timeout_s
        self._fd = stream.fileno()
        self._pending = self._read_exactly(4)
        self.announced = self._pending == b"RIFF"  # the format came from a WAV header
        if self.announced:
            self._pending = b""
            self.fmt = self._read_wav_header().check(name)
        else:
            self.fmt = fmt.check(name)

    def _read(self, size: int) -> bytes:
        """Up to `size` bytes, as soon as some arrive; b"" at the end of the stream."""
        if self.stall_timeout_s is not None:
            ready, _, _ = select.select([self._fd], [], [], self.stall_timeout_s)
            if not ready:
                raise SourceError(f"{self.name}: no data for {self.stall_timeout_s:g} s (a stalled pipe)",
                                  EXIT_BROKEN)
        return os.read(self._fd, size)

    def _read_exactly(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self._read(size - len(data))
            if not chunk:
                break
            data += chunk
        return data

    def _read_wav_header(self) -> PcmFormat:
        """Parse RIFF/WAVE chunks up to `data` (sizes of a stream may be 0 or 0xFFFFFFFF: ignored)."""
        riff = self._read_exactly(8)
        if len(riff) < 8 or riff[4:] != b"WAVE":
            raise SourceError(f"{self.name}: starts with RIFF but is not a WAVE stream", EXIT_CANNOT_START)
        fmt = None
        while True:
            header = self._read_exactly(8)
            if len(header) < 8:
                raise SourceError(f"{self.name}: WAV header ends before its data chunk", EXIT_CANNOT_START)
            chunk_id, size = header[:4], struct.unpack("<I", header[4:])[0]
            if chunk_id == b"data":
                if fmt is None:
                    raise SourceError(f"{self.name}: WAV data chunk before any fmt chunk", EXIT_CANNOT_START)
                return fmt
            body = self._read_exactly(size + size % 2)
            if chunk_id == b"fmt ":
                fmt = self._wav_format(body)

    def _wav_format(self, body: bytes) -> PcmFormat:
        if len(body) < 16:
            raise SourceError(f"{self.name}: WAV fmt chunk of {len(body)} bytes", EXIT_CANNOT_START)
        tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", body[:16])
        if tag == 0xFFFE and len(body) >= 26:  # WAVE_FORMAT_EXTENSIBLE: the subformat's first two bytes
            tag = struct.unpack("<H", body[24:26])[0]
        sample = {(1, 16): "s16le", (1, 32): "s32le", (3, 32): "f32le"}.get((tag, bits))
        if sample is None:
            raise SourceError(f"{self.name}: WAV format tag {tag} with {bits}-bit samples is not read (16/32-bit "
                              "integer or 32-bit float PCM)", EXIT_CANNOT_START)
        return PcmFormat(rate, channels, sample)

    def blocks(self, block_samples: int) -> Iterator[np.ndarray]:
        try:
            yield from mono_blocks(self._frames(block_samples), self.fmt.rate, block_samples, name=self.name)
        except AudioDecodeError as error:
            raise SourceError(str(error), EXIT_BROKEN) from None

    def _frames(self, block_samples: int) -> Iterator[np.ndarray]:
        """`(n, channels)` float32 frames as they arrive, about `block_samples` at 16 kHz a read; sets
        `trailing_bytes` when the stream ends inside a frame."""
        fmt = self.fmt
        dtype, _ = PCM_FORMATS[fmt.sample]
        read_bytes = max(fmt.frame_bytes, math.ceil(block_samples * fmt.rate / SAMPLE_RATE) * fmt.frame_bytes)
        while True:
            data = self._pending + self._read(read_bytes)
            self._pending = b""
            if len(data) == 0 or (len(data) < fmt.frame_bytes and not self._more(data)):
                self.trailing_bytes = len(data)
                return
            usable = len(data) - len(data) % fmt.frame_bytes
            self._pending = data[usable:]
            frames = np.frombuffer(data[:usable], dtype=dtype).reshape(-1, fmt.channels)
            yield frames.astype(np.float32) * np.float32(_PCM_SCALE[fmt.sample])

    def _more(self, partial: bytes) -> bool:
        """Whether a partial frame is completed by more data (else the stream ended mid-sample)."""
        more = self._read(self.fmt.frame_bytes - len(partial))
        self._pending = partial + more
        return bool(more)


class FfmpegSource(PipeSource):
    """A live input opened by the ffmpeg binary (`input_args`, e.g. "-f pulse -i default"), which writes a WAV stream
    at the input's own rate and channel count to a pipe."""

    def __init__(self, input_args: str, stall_timeout_s: float | None = 10.0) -> None:
        binary = shutil.which("ffmpeg")
        if binary is None:
            raise SourceError("--ffmpeg-input needs the ffmpeg binary on PATH (e.g. apt install ffmpeg)",
                              EXIT_CANNOT_START)
        command = [binary, "-nostdin", "-hide_banner", "-loglevel", "error", *shlex.split(input_args),
                   "-map", "0:a:0", "-c:a", "pcm_f32le", "-f", "wav", "-"]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            super().__init__(self.process.stdout, f"ffmpeg {input_args}", PcmFormat(SAMPLE_RATE, 1, "f32le"),
                             stall_timeout_s)
            if not self.announced:
                raise SourceError(f"{self.name}: ffmpeg wrote no WAV header", EXIT_CANNOT_START)
        except SourceError as error:
            raise (self._failure(EXIT_CANNOT_START) or error) from None

    def blocks(self, block_samples: int) -> Iterator[np.ndarray]:
        try:
            yield from super().blocks(block_samples)
        except SourceError as error:
            raise (self._failure(EXIT_BROKEN) or error) from None
        failure = self._failure(EXIT_BROKEN)
        if failure is not None:
            raise failure

    def _failure(self, exit_code: int) -> SourceError | None:
        """ffmpeg's own last message as the error, when it exited non-zero; a still running ffmpeg is stopped."""
        try:
            code = self.process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.close()
            return None
        if code <= 0:  # 0, or stopped by us
            return None
        lines = self.process.stderr.read().decode(errors="replace").strip().splitlines()
        return SourceError(f"{self.name}: ffmpeg failed (exit {code}): {lines[-1] if lines else 'no message'}",
                           exit_code)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def open_source(source: str | None, ffmpeg_input: str | None = None, realtime: bool = False,
                stdin_format: PcmFormat = PcmFormat(SAMPLE_RATE, 1, "s16le"),
                stall_timeout_s: float | None = 10.0, stdin: BinaryIO | None = None) -> Source:
    """The source `tag --stream` reads: `ffmpeg_input` when given, else "-" (standard input) or a file path.

    Raises:
        SourceError: the source cannot start (exit code 2).
    """
    if ffmpeg_input is not None:
        return FfmpegSource(ffmpeg_input, stall_timeout_s)
    if source == "-":
        import sys

        return PipeSource(stdin or sys.stdin.buffer, "stdin", stdin_format, stall_timeout_s)
    return FileSource(source, realtime)


@dataclass(frozen=True)
class Window:
    """One hop's window: `[start_s, end_s)` in seconds since the stream's start, `samples` `(n,)` float32 at 16 kHz
    (n = the window length, or less at the stream's start where windows grow)."""

    start_s: float
    end_s: float
    samples: np.ndarray


class SlidingWindows:
    """The last `window_samples` of a stream in a ring buffer; every `hop_samples` new samples make a `Window`
    ending there. Windows grow at the stream's start (the first ends after one hop), and `finish` gives a last window
    ending at the stream's end when samples arrived after the last hop. Memory: one window, whatever the stream's
    length."""

    def __init__(self, window_samples: int, hop_samples: int) -> None:
        if not 1 <= hop_samples <= window_samples:
            raise ValueError(f"need 1 <= hop <= window samples, got hop {hop_samples}, window {window_samples}")
        self.window_samples, self.hop_samples = window_samples, hop_samples
        self._ring = np.zeros(window_samples, np.float32)
        self.total_samples = 0  # samples pushed so far
        self._since_hop = 0

    def push(self, block: np.ndarray) -> Iterator[Window]:
        """Add `(n,)` float32 samples; yields the windows whose hops end inside them."""
        offset = 0
        while offset < len(block):
            take = min(len(block) - offset, self.hop_samples - self._since_hop)
            self._write(block[offset : offset + take])
            offset += take
            self._since_hop += take
            if self._since_hop == self.hop_samples:
                self._since_hop = 0
                yield self._window()

    def finish(self) -> Window | None:
        """The window ending at the stream's end, if samples arrived since the last hop."""
        if self._since_hop == 0:
            return None
        self._since_hop = 0
        return self._window()

    def _write(self, samples: np.ndarray) -> None:
        size = self.window_samples  # len(samples) <= hop <= size
        start = self.total_samples % size
        first = min(len(samples), size - start)
        self._ring[start : start + first] = samples[:first]
        self._ring[: len(samples) - first] = samples[first:]
        self.total_samples += len(samples)

    def _window(self) -> Window:
        held = min(self.total_samples, self.window_samples)
        end = self.total_samples % self.window_samples
        samples = (np.concatenate([self._ring[end:], self._ring[:end]]) if self.total_samples >= self.window_samples
                   else self._ring[:held].copy())
        return Window((self.total_samples - held) / SAMPLE_RATE, self.total_samples / SAMPLE_RATE, samples)
