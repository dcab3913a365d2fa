"""Inputs → shard directory: plan a seeded order, decode in parallel, write shards, then skip report and manifest.

Shared by `data_prep.audioset` and `data_prep.folder`, which only turn their inputs into `SourceRow`s (clips to
decode) and `Skip`s (rows already known to be unusable), in input order.

Held-out split (`--holdout FRACTION --holdout-out DIR`): rows are assigned by a hash of their group (the YouTube id
in AudioSet mode, so segments of one video stay together; else the key), which keeps every row's side fixed when
rows are added; rows known to be unusable stay with the main output, whose skip report accounts for them.

Long recordings: a file longer than the piece length (`--piece-s`, 60 s by default) is cut, while it is decoded, into
pieces of that length (the last one shorter), each its own sample: key `<key>-p0000`, `<key>-p0001`, ..., and a
record saying which piece of how many and where it starts (`piece`, `pieces`, `offset_s`). The input lister keeps
every other key off that pattern, so piece keys never collide with the keys of other files. Decoding streams, so a
worker holds at most two pieces of a file, whatever its length; the pieces of a file cut in several go to disk
(`.progress/spill/`) until their shard is written. The teacher pass and training then use every 10 s chunk of every
sample (`ced_train.data.chunks`).

Resuming: the plan (which row goes to which shard, in which order) depends only on the inputs and settings, and has an
id. Each finished shard gets a record under `.progress/` and is then renamed into place; a re-run with the same plan id
keeps shards that have a record and a file of the recorded SHA-256 (not only its size), and redoes the rest. The manifest is written last,
then `.progress/` is removed.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import itertools
import json
import multiprocessing
import multiprocessing.pool
import os
import random
import re
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ced_train import __version__
from ced_train.audio import SAMPLE_RATE, AudioDecodeError, AudioSource
from ced_train.data.manifest import (
    MANIFEST_FORMAT_VERSION,
    MANIFEST_NAME,
    SKIPPED_NAME,
    Skip,
    compute_fingerprint,
    read_manifest,
    write_json_atomic,
    write_manifest,
    write_skipped,
)
from ced_train.data.shards import CODECS, SHARD_FORMAT_VERSION, ShardWriter, encode_audio, file_sha256, sample_digest
from ced_train.labels import ClassLabels

DEFAULT_SAMPLES_PER_SHARD = 1000
PROGRESS_DIR = ".progress"
PLAN_NAME = "plan.json"
SPILL_DIR = "spill"
DEFAULT_PIECE_S = 60.0
PIECE_SUFFIX = re.compile(r"-p[0-9]+$")  # the end of a piece key; input listers keep other keys off it
# A whole-video file is cut to a segment when it lasts at least up to the segment's end, within this tolerance.
SPAN_TOLERANCE_S = 1.0
SHARD_GLOB = "shard-*.tar"
# Skip reasons, as they appear in skipped.tsv and the printed accounting.
MISSING, UNREADABLE, EMPTY, UNKNOWN_LABEL, DUPLICATE, MALFORMED, AMBIGUOUS = (
    "missing", "unreadable", "empty", "unknown label", "duplicate", "malformed row", "ambiguous file")


class ShardingError(Exception):
    """The output directory cannot be written as asked (holds other data, or a partial run of other inputs)."""


@dataclass(frozen=True)
class SourceRow:
    """One clip to decode. `source_row` says where it came from (`segments.csv:17`, `dogs/bark.wav`); `source_file` is
    the audio path as recorded in the shard (relative to the audio directory); `extra` goes into the JSON record.
    `span_s`: the `[start, end)` seconds to cut out of the file when it is a whole video (AudioSet's bare `YTID.ext`);
    None: the whole file."""

    source_row: str
    key: str
    path: Path
    source_file: str
    labels: tuple[int, ...] = ()
    mids: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict)
    span_s: tuple[float, float] | None = None


@dataclass(frozen=True)
class _EncodedClip:
    """One encoded sample; `audio` is the encoded bytes, or the spill file that holds them."""

    key: str
    audio: bytes | Path
    record: dict
    pcm_sha256: str

    def audio_bytes(self) -> bytes:
        """The encoded bytes (a spill file is read and removed)."""
        if isinstance(self.audio, bytes):
            return self.audio
        data = self.audio.read_bytes()
        self.audio.unlink()
        return data


@dataclass
class ShardingReport:
    out_dir: Path
    num_rows: int
    num_written: int
    num_samples: int  # samples in the shards: more than num_written when long files were cut in pieces
    skipped_by_reason: dict[str, int]
    total_hours: float
    num_shards: int
    total_bytes: int
    fingerprint: str
    clips_decoded: int = 0
    elapsed_s: float = 0.0
    workers: int = 1
    shards_reused: int = 0
    up_to_date: bool = False


def piece_key(key: str, piece: int) -> str:
    return f"{key}-p{piece:04d}"


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def plan_shards(rows: Sequence[SourceRow], samples_per_shard: int, seed: int) -> list[list[SourceRow]]:
    """Seeded shuffle of the rows (sorted by key first, so input order does not matter), cut into shards."""
    ordered = sorted(rows, key=lambda row: row.key)
    random.Random(seed).shuffle(ordered)
    return [ordered[i : i + samples_per_shard] for i in range(0, len(ordered), samples_per_shard)]


def _plan_id(plan: list[list[SourceRow]], skips: list[Skip], classes: ClassLabels, settings: dict) -> str:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    digest.update(("\t".join(classes.mids) + "\n").encode())
    for index, rows in enumerate(plan):
        digest.update(f"{shard_name(index)}\n".encode())
        for row in rows:
            size = row.path.stat().st_size if row.path.is_file() else -1
            entry = [row.key, row.source_file, size, row.labels, row.mids, row.extra, row.span_s]
            digest.update((json.dumps(entry, sort_keys=True) + "\n").encode())
    for skip in skips:
        digest.update(f"skip\t{skip.source_row}\t{skip.key}\t{skip.reason}\n".encode())
    return digest.hexdigest()


def _span(row: SourceRow, source: AudioSource) -> tuple[float, float | None] | Skip:
    """The `[start_s, stop_s)` of `source` that row `row` is (stop None: to the end of the file)."""
    if row.span_s is None:
        return 0.0, None
    start, end = row.span_s
    duration = source.duration_s
    # A file no longer than the segment is the segment (most downloads), even where its video is as short as it.
    if duration is not None and duration <= end - start + SPAN_TOLERANCE_S:
        return 0.0, None
    if duration is None or duration >= end - SPAN_TOLERANCE_S:  # the whole video: cut the segment out
        return start, end
    return Skip(row.source_row, row.key, UNREADABLE,
                f"{row.source_file}: lasts {duration:.2f} s, neither the segment [{start:g}, {end:g}) s of its video "
                f"nor the whole video")


def _encode_piece(row: SourceRow, source: AudioSource, waveform: np.ndarray, codec: str, piece: int | None = None,
                  offset: int = 0, spill_dir: Path | None = None) -> _EncodedClip:
    """One sample of `row`: the whole row (`piece` None) or its piece `piece`, starting `offset` samples into it."""
    key = row.key if piece is None else piece_key(row.key, piece)
    audio, pcm_sha256 = encode_audio(waveform, codec)
    record = {
        "key": key, "labels": list(row.labels), "mids": list(row.mids),
        "duration_s": len(waveform) / SAMPLE_RATE, "num_samples": len(waveform), "sample_rate": SAMPLE_RATE,
        "source_rate": source.source_rate, "source_channels": source.source_channels,
        "source_file": row.source_file, **row.extra,
    }
    if row.span_s is not None:
        record["span_s"] = list(row.span_s)
    if piece is not None:
        record.update(piece=piece, offset_s=offset / SAMPLE_RATE, offset_samples=offset)
        if spill_dir is not None:
            spill = spill_dir / f"{hashlib.sha1(key.encode()).hexdigest()}.{codec}"
            spill.write_bytes(audio)
            audio = spill
    return _EncodedClip(key, audio, record, pcm_sha256)


def encode_row(row: SourceRow, codec: str = "flac", piece_samples: int = round(DEFAULT_PIECE_S * SAMPLE_RATE),
               spill_dir: Path | None = None) -> list[_EncodedClip] | Skip:
    """Decode one input file, streaming, into samples of at most `piece_samples` and encode them in the shard format
    (`codec`), or say why it cannot be written (runs in workers). A file of several pieces has its encoded pieces
    written to `spill_dir` (when given) instead of returned in memory."""
    if not row.path.is_file():
        return Skip(row.source_row, row.key, MISSING, f"{row.path} disappeared after the inputs were listed")
    try:
        source = AudioSource.open(row.path)
        span = _span(row, source)
        if isinstance(span, Skip):
            return span
        blocks = source.blocks(piece_samples, start_s=span[0], stop_s=span[1])
        first = next(blocks, None)
        if first is None:
            return Skip(row.source_row, row.key, EMPTY, f"{row.source_file}: decodes to 0 samples")
        second = next(blocks, None)
        if second is None:
            return [_encode_piece(row, source, first, codec)]
        encoded, offset = [], 0
        for piece, waveform in enumerate(itertools.chain([first, second], blocks)):
            first = second = None  # the chain holds them until it moves on
            encoded.append(_encode_piece(row, source, waveform, codec, piece, offset, spill_dir))
            offset += len(waveform)
        for clip in encoded:
            clip.record["pieces"] = len(encoded)
        return encoded
    except AudioDecodeError as error:
        return Skip(row.source_row, row.key, UNREADABLE, f"{row.source_file}: {error.reason}")


def process_pool(workers: int) -> multiprocessing.pool.Pool:
    """Worker processes for decoding. Fork on Linux: spawned workers would re-import the caller's main module, which
    is all of torch and Lightning when data_prep runs inside `python -m ced_train` (seconds and ~400 MB per worker).
    The workers only use numpy, soundfile and soxr, so the caller's threads do not matter to them (as for torch's
    DataLoader workers). Elsewhere fork is unsafe (macOS system libraries), so spawn."""
    return multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn").Pool(workers)


def _encoded_rows(rows: list[SourceRow], workers: int, codec: str, piece_samples: int,
                  spill_dir: Path) -> Iterator[list[_EncodedClip] | Skip]:
    encode = functools.partial(encode_row, codec=codec, piece_samples=piece_samples, spill_dir=spill_dir)
    if workers <= 1:
        yield from map(encode, rows)
        return
    with process_pool(workers) as pool:
        yield from pool.imap(encode, rows, chunksize=2)


def _write_shard(out_dir: Path, name: str, results: Iterator[list[_EncodedClip] | Skip], count: int, bar: tqdm,
                 codec: str) -> dict:
    """Write the next `count` results as shard `name` and return its progress record (info + its skips).

    The record is saved before the shard is renamed into place, so a visible shard always has one and a re-run keeps
    it; a record without its shard (killed between the two steps) just means the shard is redone.
    """
    keys, lengths, offsets, skips, class_counts = [], [], [], [], Counter()
    content, duration_s, rows_written = hashlib.sha256(), 0.0, 0
    with ShardWriter(out_dir / name) as writer:
        for _ in range(count):
            result = next(results)
            bar.update(1)
            if isinstance(result, Skip):
                skips.append(result)
                continue
            rows_written += 1
            class_counts.update(result[0].record["labels"])
            for clip in result:
                writer.add(clip.key, clip.audio_bytes(), clip.record, codec)
                keys.append(clip.key)
                lengths.append(clip.record["num_samples"])
                offsets.append(clip.record.get("offset_samples", 0))
                duration_s += clip.record["duration_s"]
                content.update(sample_digest(clip.key, clip.record["labels"], clip.pcm_sha256))
        size, sha256 = writer.finish()
        record = {
            "name": name, "num_samples": len(keys), "rows_written": rows_written, "bytes": size, "sha256": sha256,
            "content_sha256": content.hexdigest(), "duration_s": duration_s, "keys": keys, "lengths": lengths,
            "offsets": offsets,
            "class_counts": {str(k): v for k, v in sorted(class_counts.items())},
            "skips": [[s.source_row, s.key, s.reason, s.detail] for s in skips],
        }
        write_json_atomic(out_dir / PROGRESS_DIR / f"{name}.json", record)
        writer.publish()
    return record


def _prepare_out_dir(out_dir: Path, plan_id: str, overwrite: bool) -> bool:
    """Make `out_dir` ready for this plan; True when it already holds the finished result of this exact plan."""
    progress = out_dir / PROGRESS_DIR
    if overwrite and out_dir.exists():
        for path in [*out_dir.glob(SHARD_GLOB), *out_dir.glob(".*.partial-*"),
                     out_dir / MANIFEST_NAME, out_dir / SKIPPED_NAME]:
            path.unlink(missing_ok=True)
        shutil.rmtree(progress, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / MANIFEST_NAME).is_file():
        try:
            existing = read_manifest(out_dir)
        except (OSError, ValueError) as error:
            raise ShardingError(f"{error}; pass --overwrite to rebuild {out_dir}") from None
        if existing.plan_id != plan_id:
            raise ShardingError(
                f"{out_dir} already holds shards made from other inputs or settings (plan {existing.plan_id[:12]}, "
                f"this run {plan_id[:12]}); pass --overwrite to replace them, or choose another --out"
            )
        shutil.rmtree(progress, ignore_errors=True)
        return True
    plan_file = progress / PLAN_NAME
    if plan_file.is_file():
        previous = json.loads(plan_file.read_text())["plan_id"]
        if previous != plan_id:
            raise ShardingError(
                f"{out_dir} holds a partial run of other inputs or settings (plan {previous[:12]}, this run "
                f"{plan_id[:12]}); pass --overwrite to discard it, or choose another --out"
            )
    elif any(out_dir.glob(SHARD_GLOB)):
        raise ShardingError(f"{out_dir} holds shard files but no {MANIFEST_NAME} or {PROGRESS_DIR}/{PLAN_NAME} that "
                            f"says what made them; pass --overwrite to replace them, or choose another --out")
    progress.mkdir(exist_ok=True)
    shutil.rmtree(progress / SPILL_DIR, ignore_errors=True)  # pieces of a killed run's unfinished shard
    (progress / SPILL_DIR).mkdir()
    write_json_atomic(plan_file, {"plan_id": plan_id})
    for stale in out_dir.glob(".*.partial-*"):  # temporary files of a killed run
        stale.unlink()
    return False


def _finished_record(out_dir: Path, name: str) -> dict | None:
    record_path = out_dir / PROGRESS_DIR / f"{name}.json"
    if not record_path.is_file():
        return None
    record = json.loads(record_path.read_text())
    shard = out_dir / name
    if not shard.is_file() or shard.stat().st_size != record["bytes"]:
        return None
    return record if file_sha256(shard) == record["sha256"] else None


def build_shards(
    inputs: Sequence[SourceRow | Skip],
    out_dir: str | Path,
    classes: ClassLabels,
    *,
    tool: str,
    labelled: bool,
    samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD,
    codec: str = "flac",
    workers: int = 1,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    split: dict | None = None,
    piece_s: float = DEFAULT_PIECE_S,
) -> ShardingReport:
    """Write `inputs` (one entry per input row, in input order) as a shard directory; see the module docstring.
    `split` describes which side of a held-out split this is (recorded in the plan and the manifest); files longer
    than `piece_s` seconds are cut into pieces of that length."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if not piece_s >= 1.0:
        raise ValueError(f"piece length must be at least 1 s, got {piece_s}")
    piece_samples = round(piece_s * SAMPLE_RATE)
    out_dir = Path(out_dir)
    rows = [item for item in inputs if isinstance(item, SourceRow)]
    known_skips = [item for item in inputs if isinstance(item, Skip)]
    duplicates = [key for key, n in Counter(row.key for row in rows).items() if n > 1]
    if duplicates:
        raise ValueError(f"sample keys must be unique; repeated: {duplicates[:5]}")
    plan = plan_shards(rows, samples_per_shard, seed)
    if codec not in CODECS:
        raise ValueError(f"codec {codec!r} unknown; expected one of {', '.join(CODECS)}")
    settings = {"tool": tool, "format": SHARD_FORMAT_VERSION, "manifest": MANIFEST_FORMAT_VERSION, "seed": seed,
                "samples_per_shard": samples_per_shard, "labelled": labelled, "codec": codec,
                "piece_samples": piece_samples}
    if split:
        settings["split"] = split
    plan_id = _plan_id(plan, known_skips, classes, settings)
    if _prepare_out_dir(out_dir, plan_id, overwrite):
        return _report_from_manifest(out_dir, workers)

    names = [shard_name(i) for i in range(len(plan))]
    records = {name: _finished_record(out_dir, name) for name in names}
    pending = [(name, shard_rows) for name, shard_rows in zip(names, plan) if records[name] is None]
    todo = [row for _, shard_rows in pending for row in shard_rows]
    start = time.perf_counter()
    with tqdm(total=len(rows), initial=len(rows) - len(todo), unit="clip", desc=f"sharding {out_dir.name}",
              file=sys.stderr, disable=not progress, dynamic_ncols=True) as bar:
        with closing(_encoded_rows(todo, workers, codec, piece_samples, out_dir / PROGRESS_DIR / SPILL_DIR)) as results:
            for name, shard_rows in pending:
                records[name] = _write_shard(out_dir, name, results, len(shard_rows), bar, codec)
    elapsed_s = time.perf_counter() - start

    order = {item.source_row: i for i, item in enumerate(inputs)}
    skips = known_skips + [Skip(*fields) for name in names for fields in records[name]["skips"]]
    skips.sort(key=lambda skip: order[skip.source_row])
    class_counts = [0] * len(classes)
    for name in names:
        for index, count in records[name]["class_counts"].items():
            class_counts[int(index)] += count
    shard_infos = [{k: records[n][k] for k in ("name", "num_samples", "bytes", "sha256", "content_sha256",
                                               "duration_s", "keys", "lengths", "offsets")} for n in names]
    write_skipped(out_dir, skips)
    write_manifest(out_dir, {
        "tool": tool, "tool_version": __version__, "seed": seed, "samples_per_shard": samples_per_shard,
        "codec": codec, "sample_rate": SAMPLE_RATE, "labelled": labelled, "num_classes": len(classes),
        "class_labels": {"mids": list(classes.mids), "names": list(classes.names)},
        "num_rows": len(inputs), "num_written": sum(records[n]["rows_written"] for n in names),
        "piece_s": piece_samples / SAMPLE_RATE,
        "skipped_by_reason": dict(Counter(skip.reason for skip in skips).most_common()),
        "total_hours": sum(info["duration_s"] for info in shard_infos) / 3600, "class_counts": class_counts,
        "plan_id": plan_id, **({"split": split} if split else {}),
        "fingerprint": compute_fingerprint(classes.mids, [(i["name"], i["content_sha256"]) for i in shard_infos]),
        "shards": shard_infos,
    })
    shutil.rmtree(out_dir / PROGRESS_DIR, ignore_errors=True)
    report = _report_from_manifest(out_dir, workers)
    report.clips_decoded, report.elapsed_s, report.shards_reused = len(todo), elapsed_s, len(names) - len(pending)
    report.up_to_date = False
    return report


def _report_from_manifest(out_dir: Path, workers: int) -> ShardingReport:
    manifest = read_manifest(out_dir)
    report = ShardingReport(
        out_dir=out_dir, num_rows=manifest.num_rows, num_written=manifest.num_written, num_samples=manifest.num_samples,
        skipped_by_reason=manifest.skipped_by_reason, total_hours=manifest.total_hours,
        num_shards=len(manifest.shards), total_bytes=sum(s.bytes for s in manifest.shards),
        fingerprint=manifest.fingerprint, workers=workers, shards_reused=len(manifest.shards), up_to_date=True,
    )
    num_skipped = sum(report.skipped_by_reason.values())
    if report.num_written + num_skipped != report.num_rows:  # the accounting promise; a violation is a bug here
        raise AssertionError(f"{out_dir}: {report.num_written} written + {num_skipped} skipped != {report.num_rows}")
    return report


def format_report(report: ShardingReport) -> str:
    skipped = sum(report.skipped_by_reason.values())
    reasons = ", ".join(f"{reason} {n}" for reason, n in report.skipped_by_reason.items())
    lines = [
        f"rows {report.num_rows}: written {report.num_written}, skipped {skipped}"
        + (f" ({reasons})" if reasons else "")
        + (f"; {report.num_samples} samples (long files cut in pieces)" if report.num_samples != report.num_written
           else ""),
        f"audio {report.total_hours:.3f} h in {report.num_shards} shards, {report.total_bytes / 1e6:.1f} MB, "
        f"fingerprint {report.fingerprint[:16]}",
    ]
    if report.up_to_date:
        lines.append("nothing to do: the output already holds these inputs with these settings")
    else:
        rate = report.clips_decoded / report.elapsed_s if report.elapsed_s > 0 else 0.0
        resumed = f", {report.shards_reused} shards kept from an earlier run" if report.shards_reused else ""
        lines.append(f"throughput {rate:.1f} clips/s ({report.clips_decoded} clips in {report.elapsed_s:.1f} s, "
                     f"{report.workers} workers){resumed}")
    lines.append(f"outputs: {report.out_dir}/ ({MANIFEST_NAME}, {SKIPPED_NAME}, {SHARD_GLOB})")
    return "\n".join(lines)


def available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="output directory for shards, manifest, skip report")
    parser.add_argument("--samples-per-shard", type=int, default=DEFAULT_SAMPLES_PER_SHARD,
                        help=f"clips per shard (default {DEFAULT_SAMPLES_PER_SHARD})")
    parser.add_argument("--codec", choices=CODECS, default="flac",
                        help="audio in the shards: flac (compact, default) or pcm16 (raw int16, 2 to 3 times the bytes, "
                             "no decoding: for nodes where FLAC decoding bounds the loaders)")
    parser.add_argument("--workers", type=int, default=available_cpus(),
                        help="decoding processes (default: the CPUs available)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample order (default 0)")
    parser.add_argument("--piece-s", type=float, default=DEFAULT_PIECE_S,
                        help=f"files longer than this many seconds are cut into pieces of this length, each a sample "
                             f"(default {DEFAULT_PIECE_S:g}; training uses every 10 s chunk of every sample)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an output directory that holds other shards or a partial run of other inputs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--holdout", type=float, default=0.0,
                        help="fraction of the clips written to --holdout-out instead (a validation split), chosen by a "
                             "hash of the YouTube id or key (default 0: none)")
    parser.add_argument("--holdout-out", type=Path, default=None, help="output directory of the held-out clips")


def holdout_fraction_of(row: SourceRow) -> float:
    """A row's fixed position in [0, 1) for held-out splits: 64 bits of blake2b over its group (YouTube id or key)."""
    group = str(row.extra.get("ytid", row.key))
    digest = hashlib.blake2b(group.encode(), digest_size=8, person=b"ced-holdout").digest()
    return int.from_bytes(digest, "little") / 2**64


def split_holdout(inputs: Sequence[SourceRow | Skip], fraction: float) -> tuple[list, list]:
    """`inputs` → (main: rows not held out and every `Skip`, held out: rows whose `holdout_fraction_of` < fraction)."""
    held = [isinstance(item, SourceRow) and holdout_fraction_of(item) < fraction for item in inputs]
    return ([item for item, h in zip(inputs, held) if not h], [item for item, h in zip(inputs, held) if h])


def run_cli(inputs: Sequence[SourceRow | Skip], classes: ClassLabels, args: argparse.Namespace, *, tool: str,
            labelled: bool) -> int:
    """Shared tail of the data_prep CLIs: split off the held-out clips, build, print the accounting, map refusals to
    exit code 2."""
    if not 0.0 <= args.holdout < 1.0 or (args.holdout > 0) != (args.holdout_out is not None):
        print(f"{tool}: error: --holdout must lie in [0, 1) and comes with --holdout-out (found {args.holdout}, "
              f"{args.holdout_out})", file=sys.stderr)
        return 2
    parts = [(args.out, inputs, None)]
    if args.holdout > 0:
        main, held = split_holdout(inputs, args.holdout)
        if not held:
            print(f"{tool}: error: --holdout {args.holdout} of {len(inputs)} rows selects none", file=sys.stderr)
            return 2
        parts = [(args.out, main, {"fraction": args.holdout, "part": "rest", "other": str(args.holdout_out)}),
                 (args.holdout_out, held, {"fraction": args.holdout, "part": "held out", "other": str(args.out)})]
    for out, part_inputs, split in parts:
        try:
            report = build_shards(part_inputs, out, classes, tool=tool, labelled=labelled,
                                  samples_per_shard=args.samples_per_shard, codec=args.codec, workers=args.workers,
                                  seed=args.seed, overwrite=args.overwrite, progress=not args.no_progress, split=split,
                                  piece_s=args.piece_s)
        except ShardingError as error:
            print(f"{tool}: error: {error}", file=sys.stderr)
            return 2
        except OSError as error:  # a full disk, a read-only or vanished output directory
            print(f"{tool}: error: writing {out}: {error.strerror or error}; shards finished so far are kept and a "
                  "re-run resumes after them", file=sys.stderr)
            return 2
        if split:
            print(f"{out}: {split['part']} ({len(part_inputs)} of {len(inputs)} rows; held-out fraction "
                  f"{split['fraction']})")
        print(format_report(report))
    return 0
