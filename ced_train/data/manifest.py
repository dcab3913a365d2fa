"""`manifest.json` and `skipped.tsv` (writer and reader): what a shard directory holds and what was left out.

The manifest is written last and atomically, so its presence means the directory is complete. Its `fingerprint`
covers the class table, the shard names and, per sample, key, labels and a hash of the 16-bit audio samples (not the
FLAC bytes, which depend on the encoder build): equal content gives an equal fingerprint on any machine, and any change
of a clip, a label or the shard layout changes it. Later stages record it and refuse a mismatch.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

MANIFEST_NAME = "manifest.json"
SKIPPED_NAME = "skipped.tsv"
# 2: shards list each sample's length and source offset (chunk layouts come from the manifest alone).
MANIFEST_FORMAT_VERSION = 2
SKIPPED_COLUMNS = ("source_row", "key", "reason", "detail")
SKIPPED_HEADER = "\t".join(SKIPPED_COLUMNS)


@dataclass(frozen=True)
class ShardInfo:
    name: str
    path: Path
    num_samples: int
    bytes: int
    sha256: str  # of the tar file's bytes
    content_sha256: str  # of the shard's sample digests (see module docstring)
    duration_s: float
    keys: tuple[str, ...]
    lengths: tuple[int, ...]  # samples at 16 kHz per key, stored order
    offsets: tuple[int, ...]  # where each sample starts in its input row's audio, samples at 16 kHz (0: not a piece)


@dataclass(frozen=True)
class Skip:
    """One input row that was not written. `reason` is a short category (`missing`, `unreadable`, ...)."""

    source_row: str
    key: str
    reason: str
    detail: str


@dataclass(frozen=True)
class Manifest:
    root: Path
    fingerprint: str
    num_classes: int
    class_mids: tuple[str, ...]
    class_names: tuple[str, ...]
    labelled: bool
    shards: list[ShardInfo]
    class_counts: tuple[int, ...]
    total_hours: float
    num_rows: int
    num_written: int  # input rows written (a long file cut in pieces is one row and several samples)
    skipped_by_reason: dict[str, int]
    seed: int
    tool: str
    tool_version: str
    plan_id: str
    codec: str = "flac"  # of the audio members (`shards.CODECS`); manifests before codecs hold FLAC

    @property
    def num_samples(self) -> int:
        return sum(shard.num_samples for shard in self.shards)

    @property
    def shard_paths(self) -> list[Path]:
        return [shard.path for shard in self.shards]

    def shard_of_key(self) -> dict[str, str]:
        """Key → name of the shard that holds it."""
        return {key: shard.name for shard in self.shards for key in shard.keys}


def compute_fingerprint(class_mids: list[str] | tuple[str, ...], shards: list[tuple[str, str]]) -> str:
    """Content fingerprint from the class table and `(shard name, shard content_sha256)` pairs in order."""
    digest = hashlib.sha256(f"ced-train shards v{MANIFEST_FORMAT_VERSION}\n".encode())
    digest.update(("\t".join(class_mids) + "\n").encode())
    for name, content_sha256 in shards:
        digest.update(f"{name}\t{content_sha256}\n".encode())
    return digest.hexdigest()


def _dumps(payload: dict) -> str:
    """JSON with one line per top-level field and per element of a list of objects (shards), so that the manifest of
    a large dataset stays readable with `head` and diffable, unlike one line or one line per key."""
    def value(item) -> str:
        if isinstance(item, list) and item and all(isinstance(x, dict) for x in item):
            return "[\n" + ",\n".join(f"  {json.dumps(x)}" for x in item) + "\n ]"
        return json.dumps(item)

    return "{\n" + ",\n".join(f" {json.dumps(k)}: {value(v)}" for k, v in payload.items()) + "\n}\n"


def _write_text_atomic(path: Path, text: str) -> None:
    """Write under a hidden temporary name, fsync, then rename and fsync the directory: readers see the old file or
    the whole new one, also after a power loss."""
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def write_json_atomic(path: Path, payload: dict) -> None:
    _write_text_atomic(path, _dumps(payload))


def write_manifest(root: str | Path, payload: dict) -> Path:
    """Write `payload` (the fields read back by `read_manifest`) as `root/manifest.json`, atomically."""
    path = Path(root) / MANIFEST_NAME
    write_json_atomic(path, {"format_version": MANIFEST_FORMAT_VERSION, **payload})
    return path


def read_manifest(shards_dir: str | Path, check_files: bool = True) -> Manifest:
    """Read `shards_dir/manifest.json`; with `check_files`, also check every shard file exists with its recorded size.
    A URL (`https://...`, `s3://...`, `pipe:...{}...`) is read from its verified local copy (`remote.py`), which is
    then the manifest's `root`.

    Raises:
        FileNotFoundError / ValueError: naming the directory and what is missing or wrong.
        remote.RemoteShardError (an OSError): a URL whose files could not be fetched or do not match the manifest.
    """
    from ced_train.data import remote  # it imports this module

    root = remote.local_shards_dir(str(shards_dir)) if remote.is_url(shards_dir) else Path(shards_dir)
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{root}: no {MANIFEST_NAME}; this is not a finished shard directory (run data_prep.audioset or "
            f"data_prep.folder with --out {root})"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        version = raw.get("format_version")
        if version != MANIFEST_FORMAT_VERSION:
            older = isinstance(version, int) and version < MANIFEST_FORMAT_VERSION
            raise ValueError(f"expected format_version {MANIFEST_FORMAT_VERSION}, found {version!r}"
                             + ("; it was written by an older data_prep: re-run it with --overwrite" if older else ""))
        shards = [
            ShardInfo(s["name"], root / s["name"], int(s["num_samples"]), int(s["bytes"]), s["sha256"],
                      s["content_sha256"], float(s["duration_s"]), tuple(s["keys"]),
                      tuple(map(int, s["lengths"])), tuple(map(int, s["offsets"])))
            for s in raw["shards"]
        ]
        manifest = Manifest(
            root=root, fingerprint=raw["fingerprint"], num_classes=int(raw["num_classes"]),
            class_mids=tuple(raw["class_labels"]["mids"]), class_names=tuple(raw["class_labels"]["names"]),
            labelled=bool(raw["labelled"]), shards=shards, class_counts=tuple(raw["class_counts"]),
            total_hours=float(raw["total_hours"]), num_rows=int(raw["num_rows"]),
            num_written=int(raw["num_written"]),
            skipped_by_reason=dict(raw["skipped_by_reason"]), seed=int(raw["seed"]), tool=raw["tool"],
            tool_version=raw["tool_version"], plan_id=raw["plan_id"], codec=raw.get("codec", "flac"),
        )
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: invalid shard manifest ({type(error).__name__}: {error})") from None
    for shard in shards:
        if not shard.num_samples == len(shard.keys) == len(shard.lengths) == len(shard.offsets):
            raise ValueError(f"{path}: shard {shard.name} lists {len(shard.keys)} keys, {len(shard.lengths)} lengths "
                             f"and {len(shard.offsets)} offsets for {shard.num_samples} samples")
        if check_files:
            if not shard.path.is_file():
                raise FileNotFoundError(f"{root}: shard {shard.name} is listed in {MANIFEST_NAME} but missing")
            size = shard.path.stat().st_size
            if size != shard.bytes:
                raise ValueError(f"{root}: shard {shard.name} has {size} bytes, {MANIFEST_NAME} says {shard.bytes}")
    return manifest


def _tsv_field(text: str) -> str:
    return " ".join(str(text).split())  # tabs and newlines in messages would break the columns


def write_skipped(root: str | Path, skips: list[Skip]) -> Path:
    """Write `root/skipped.tsv` atomically: a header line, then one line per skipped input row."""
    path = Path(root) / SKIPPED_NAME
    lines = [SKIPPED_HEADER]
    lines += ["\t".join(_tsv_field(v) for v in (s.source_row, s.key, s.reason, s.detail)) for s in skips]
    _write_text_atomic(path, "\n".join(lines) + "\n")
    return path


def read_skipped(root: str | Path) -> list[Skip]:
    path = Path(root) / SKIPPED_NAME
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or lines[0] != SKIPPED_HEADER:
        raise ValueError(f"{path}: expected the header line {SKIPPED_HEADER!r}, found {lines[:1]}")
    skips = []
    for line_no, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) != len(SKIPPED_COLUMNS):
            raise ValueError(
                f"{path}:{line_no}: expected {len(SKIPPED_COLUMNS)} tab-separated fields, found {len(fields)}")
        skips.append(Skip(*fields))
    return skips
