"""Shard format (writer and reader): webdataset tar files of `<key>.<codec>` + `<key>.json` pairs.

Format version 2 (version 1 is its FLAC-only case and reads the same):
- the audio, 16-bit, 16 kHz, mono, the clip's real duration (nothing padded), in one of two codecs (`CODECS`), the
  same for a whole shard directory (its manifest's `codec`): `<key>.flac`, FLAC (compact, the default), or
  `<key>.pcm16`, the raw little-endian int16 samples (2 to 3 times the bytes, no decoding cost). Both hold the same
  samples, so they give the same content fingerprint.
- `<key>.json`: `key`, `labels` (class indices), `mids`, `duration_s`, `num_samples`, `sample_rate`, `source_rate`,
  `source_channels`, `source_file`, and for AudioSet rows `ytid`, `start_s`, `end_s`.
Members are written with fixed ownership and mtime so that equal inputs give byte-identical tars.

Keys use only `[A-Za-z0-9_-]`: webdataset cuts a member name at its first dot to find the sample key
(`YTID_30.000.flac` would be sample `YTID_30` with extension `000.flac`), and `__x__` names are its metadata.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile

from ced_train.audio import SAMPLE_RATE

SHARD_FORMAT_VERSION = 2
CODECS = ("flac", "pcm16")
META_EXT = "json"
KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")
_TAR_MTIME = 0


class ShardFormatError(ValueError):
    """A shard that does not follow the format above; the message names the shard and the key."""


@dataclass
class Clip:
    """One decoded sample. `waveform`: (samples,) float32 at 16 kHz (numpy from `iter_shard`, torch from `ClipStream`;
    int16 from `iter_shard(dtype="int16")`).

    `clip["key"]` works as well as `clip.key`, so code written against webdataset-style dict samples reads Clips too.
    """

    key: str
    waveform: Any
    labels: list[int]
    meta: dict = field(repr=False)
    shard: str

    def __getitem__(self, name: str) -> Any:
        if name not in self.__dataclass_fields__:
            raise KeyError(name)
        return getattr(self, name)


def check_key(key: str) -> str:
    """Return `key` if it is a usable sample key, else raise ValueError saying why."""
    if not KEY_PATTERN.match(key):
        raise ValueError(f"sample key {key!r} must be non-empty and use only letters, digits, '_' and '-'")
    return key


def encode_audio(waveform: np.ndarray, codec: str = "flac") -> tuple[bytes, str]:
    """`(samples,)` float waveform in [-1, 1] at 16 kHz → (member bytes in `codec`, sha256 of the int16 samples).

    Quantisation is done here, with clipping, rather than by libsndfile, so the hash describes exactly what is stored.
    """
    if codec not in CODECS:
        raise ValueError(f"codec {codec!r} unknown; expected one of {', '.join(CODECS)}")
    pcm = np.clip(np.round(np.asarray(waveform, dtype=np.float64) * 32767.0), -32768, 32767).astype("<i2")
    digest = hashlib.sha256(pcm.tobytes()).hexdigest()
    if codec == "pcm16":
        return pcm.tobytes(), digest
    buffer = io.BytesIO()
    soundfile.write(buffer, pcm, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return buffer.getvalue(), digest


def decode_audio(data: bytes, codec: str, where: str = "<bytes>", dtype: str = "float32") -> np.ndarray:
    """Member bytes in `codec` → (samples,) float32 in [-1, 1), int16 / 32768 as libsndfile scales FLAC (both codecs
    decode to identical arrays), or with `dtype="int16"` the stored int16 samples themselves; checks FLAC's 16 kHz
    mono rule."""
    if dtype not in ("float32", "int16"):
        raise ValueError(f"dtype {dtype!r} unknown; expected 'float32' or 'int16'")
    if codec == "pcm16":
        if len(data) % 2:
            raise ShardFormatError(f"{where}: .pcm16 member of odd length {len(data)}")
        pcm = np.frombuffer(data, dtype="<i2")
        return pcm.astype(np.int16) if dtype == "int16" else pcm.astype(np.float32) / np.float32(32768.0)
    try:
        waveform, rate = soundfile.read(io.BytesIO(data), dtype=dtype, always_2d=True)
    except (soundfile.SoundFileError, RuntimeError) as error:
        raise ShardFormatError(f"{where}: audio does not decode as FLAC ({error})") from None
    if rate != SAMPLE_RATE or waveform.shape[1] != 1:
        raise ShardFormatError(
            f"{where}: expected {SAMPLE_RATE} Hz mono audio, found {rate} Hz with {waveform.shape[1]} channels"
        )
    return waveform[:, 0]


def sample_digest(key: str, labels: list[int], pcm_sha256: str) -> bytes:
    """What the content fingerprint covers for one sample: key, labels and the audio samples' hash."""
    return f"{key}\t{','.join(map(str, labels))}\t{pcm_sha256}\n".encode()


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class ShardWriter:
    """Write one shard under a hidden temporary name, so that a visible shard is always complete.

    `close()` = `finish()` (complete and sync the tar, return its size and sha256) then `publish()` (rename into
    place); callers that must record a finished shard before it becomes visible call the two steps themselves.
    As a context manager: closes on success; on an exception removes the temporary file and publishes nothing.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.tmp_path = self.path.with_name(f".{self.path.name}.partial-{os.getpid()}")
        self._tar = tarfile.open(self.tmp_path, "w", format=tarfile.PAX_FORMAT)
        self._keys: set[str] = set()
        self._finished = self._published = False

    def add(self, key: str, audio: bytes, record: dict, codec: str = "flac") -> None:
        """One sample: `audio` as made by `encode_audio(..., codec)`, and its JSON record."""
        check_key(key)
        if key in self._keys:
            raise ValueError(f"{self.path}: duplicate sample key {key!r}")
        if record.get("key") != key:
            raise ValueError(f"{self.path}: record for {key!r} has key {record.get('key')!r}")
        self._keys.add(key)
        if codec not in CODECS:
            raise ValueError(f"codec {codec!r} unknown; expected one of {', '.join(CODECS)}")
        self._add_member(f"{key}.{codec}", audio)
        self._add_member(f"{key}.{META_EXT}", json.dumps(record, sort_keys=True).encode())

    def _add_member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), _TAR_MTIME, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))

    def finish(self) -> tuple[int, str]:
        """Complete the tar under its temporary name; return (size in bytes, sha256 of the bytes)."""
        self._tar.close()
        sha256 = file_sha256(self.tmp_path)
        with open(self.tmp_path, "rb") as handle:
            os.fsync(handle.fileno())
        self._finished = True
        return self.tmp_path.stat().st_size, sha256

    def publish(self) -> None:
        os.replace(self.tmp_path, self.path)
        self._published = True

    def close(self) -> None:
        if not self._finished:
            self.finish()
        if not self._published:
            self.publish()

    def abort(self) -> None:
        try:
            self._tar.close()
        except OSError:  # closing flushes, which fails again on a full disk
            pass
        finally:
            self.tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def decode_sample(key: str, members: Mapping[str, bytes], shard: str, dtype: str = "float32") -> Clip:
    """Build a Clip from one sample's member bytes (`{"flac" | "pcm16": ..., "json": ...}`); `dtype` as in
    `decode_audio`."""
    where = f"{shard}: sample {key!r}"
    audio = [codec for codec in CODECS if codec in members]
    if len(audio) != 1 or META_EXT not in members:
        raise ShardFormatError(f"{where}: expected one audio member (.{' or .'.join(CODECS)}) and .{META_EXT}, "
                               f"found {sorted('.' + ext for ext in members)}")
    try:
        meta = json.loads(members[META_EXT])
    except ValueError as error:
        raise ShardFormatError(f"{where}: .{META_EXT} is not valid JSON ({error})") from None
    if meta.get("key") != key:
        raise ShardFormatError(f"{where}: record names key {meta.get('key')!r}")
    return Clip(key, decode_audio(members[audio[0]], audio[0], where, dtype), list(meta.get("labels", [])), meta, shard)


def _split_member_name(name: str, shard: str) -> tuple[str, str]:
    key, dot, ext = name.partition(".")
    if not dot or "/" in name:
        raise ShardFormatError(
            f"{shard}: unexpected member {name!r}, expected '<key>.<{'|'.join(CODECS)}>' or '<key>.{META_EXT}'")
    return key, ext.lower()


def iter_shard(path: str | Path, start: int = 0, stop: int | None = None, dtype: str = "float32") -> Iterator[Clip]:
    """Decode the clips of rows `[start, stop)` of one shard (default: all), in stored order; `dtype` of the
    waveforms as in `decode_audio`.

    A sequential read of the tar: rows before `start` are read but not decoded, and reading ends at `stop`.
    """
    path = Path(path)
    row, current_key, members = -1, None, {}
    with tarfile.open(path, "r|") as tar:
        for info in tar:
            if not info.isreg():
                continue
            key, ext = _split_member_name(info.name, path.name)
            if key != current_key:
                if current_key is not None and row >= start:
                    yield decode_sample(current_key, members, path.name, dtype)
                row, current_key, members = row + 1, key, {}
                if stop is not None and row >= stop:
                    return
            if row >= start:
                members[ext] = tar.extractfile(info).read()
    if current_key is not None and row >= start:
        yield decode_sample(current_key, members, path.name, dtype)


def iter_records(path: str | Path) -> Iterator[dict]:
    """The JSON records of one shard's samples, in stored order, without decoding any audio."""
    path = Path(path)
    with tarfile.open(path, "r|") as tar:
        for info in tar:
            if info.isreg() and _split_member_name(info.name, path.name)[1] == "json":
                yield json.loads(tar.extractfile(info).read())


def read_shard(path: str | Path) -> dict[str, Clip]:
    """All clips of one shard by key, in stored order. Holds every waveform in memory (about 640 kB per 10 s clip);
    `ShardReader` gives the same mapping but decodes on access."""
    clips: dict[str, Clip] = {}
    for clip in iter_shard(path):
        if clip.key in clips:
            raise ShardFormatError(f"{Path(path).name}: duplicate sample key {clip.key!r}")
        clips[clip.key] = clip
    return clips


class ShardReader(Mapping):
    """Random access by key within one shard: indexes member offsets once, decodes one clip per lookup."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._offsets: dict[str, dict[str, tuple[int, int]]] = {}
        with tarfile.open(self.path, "r:") as tar:
            for info in tar.getmembers():
                if info.isreg():
                    key, ext = _split_member_name(info.name, self.path.name)
                    self._offsets.setdefault(key, {})[ext] = (info.offset_data, info.size)

    def __getitem__(self, key: str) -> Clip:
        members = {}
        with open(self.path, "rb") as handle:
            for ext, (offset, size) in self._offsets[key].items():
                handle.seek(offset)
                members[ext] = handle.read(size)
        return decode_sample(key, members, self.path.name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._offsets)

    def __len__(self) -> int:
        return len(self._offsets)
