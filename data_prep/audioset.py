"""AudioSet segment CSVs + a directory of downloaded clips → webdataset shards.

    python -m data_prep.audioset --segments balanced_train_segments.csv --audio-dir DIR \\
        [--class-labels class_labels_indices.csv] --out shards/balanced_train [--samples-per-shard N] [--workers N]

Every CSV row ends up either in a shard or in `skipped.tsv` with a reason. A file named by the segment
(`YTID_START.ext`, `YTID_START_END.ext`) is taken to hold the segment already, as every public AudioSet download does.
A file named by the video alone (`YTID.ext`, `YYTID.ext`) is taken whole when it lasts no longer than the segment
(it is the segment), else cut to the segment's `[start, end)` when it lasts up to the segment's end (the whole video); when several rows would map to one such file, each is
skipped as `ambiguous file`. Sample keys are `<YTID>_<start in ms>`
(`--PJHxphWEs_30000`), because a dot in `YTID_30.000` would end the key for webdataset. Without --class-labels the
classes are those of the `class_labels_indices.csv` beside the first segment CSV, where AudioSet's download puts it
and a directory of your own labelled audio may hold your classes, else those of the shipped 527-class file.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from ced_train.audio import FFMPEG_EXTENSIONS
from ced_train.data.manifest import Skip
from ced_train.labels import ClassLabels, default_label_file, load_class_labels
from data_prep.scan import audio_files
from data_prep.sharding import (
    AMBIGUOUS,
    DUPLICATE,
    MALFORMED,
    MISSING,
    UNKNOWN_LABEL,
    SourceRow,
    add_output_arguments,
    run_cli,
)

TOOL = "data_prep.audioset"
LABEL_FILE_NAME = "class_labels_indices.csv"
YTID_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")
# Among files of one clip in several formats, prefer lossless, then what soundfile reads, then what needs ffmpeg.
_EXTENSION_RANK = {ext: rank for rank, ext in enumerate(
    [".flac", ".wav", ".aif", ".aiff", ".ogg", ".oga", ".mp3", *sorted(FFMPEG_EXTENSIONS)])}


class AudioIndex:
    """Audio files under a directory (recursively, symlinked subdirectories included) by file name without
    extension."""

    def __init__(self, audio_dir: Path) -> None:
        self.audio_dir = audio_dir
        self.by_stem: dict[str, list[Path]] = {}
        for path in audio_files(audio_dir):
            self.by_stem.setdefault(path.stem, []).append(path)

    def find(self, stems: Sequence[str]) -> Path | None:
        """The file of the first stem that has one; the most preferred format when there are several."""
        for stem in stems:
            if stem in self.by_stem:
                return min(self.by_stem[stem], key=lambda p: (_EXTENSION_RANK[p.suffix.lower()], str(p)))
        return None


def time_spellings(seconds: float) -> list[str]:
    """How file names write a segment time: `30.000`, `30.0`, `30` (`12.340`, `12.34`), milliseconds `30000`."""
    fixed = f"{seconds:.3f}"
    spellings = [fixed, f"{seconds:.1f}" if round(seconds, 1) == seconds else None, fixed.rstrip("0").rstrip("."),
                 str(round(seconds * 1000))]
    return list(dict.fromkeys(s for s in spellings if s is not None))


def candidate_stems(ytid: str, start_s: float, end_s: float) -> list[str]:
    """File names (without extension) a clip may have, most specific first; `Y` prefix as in several downloaders."""
    stems = []
    for prefix in ("", "Y"):
        stems += [f"{prefix}{ytid}_{s}_{e}" for s in time_spellings(start_s) for e in time_spellings(end_s)]
        stems += [f"{prefix}{ytid}_{s}" for s in time_spellings(start_s)]
        stems.append(f"{prefix}{ytid}")
    return stems


def clip_key(ytid: str, start_s: float) -> str:
    return f"{ytid}_{round(start_s * 1000)}"


def read_segments(csv_paths: Sequence[Path], audio: AudioIndex, classes: ClassLabels) -> list[SourceRow | Skip]:
    """One entry per data row of official segment CSVs (`#` lines are comments), in file order."""
    entries: list[SourceRow | Skip] = []
    seen: dict[str, str] = {}
    lines = []
    for csv_path in csv_paths:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            lines += [(csv_path, line_no, line) for line_no, line in enumerate(handle, start=1)]
    for csv_path, line_no, line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        source_row = f"{csv_path.name}:{line_no}"
        fields = next(csv.reader([line], skipinitialspace=True))
        if len(fields) != 4:
            entries.append(Skip(source_row, "", MALFORMED, f"expected 4 fields 'YTID, start, end, \"mids\"', "
                                                            f"found {len(fields)}: {line.strip()[:80]}"))
            continue
        ytid, start_text, end_text, mid_text = (f.strip() for f in fields)
        try:
            start_s, end_s = float(start_text), float(end_text)
        except ValueError:
            entries.append(Skip(source_row, ytid, MALFORMED,
                                f"start/end are not numbers: {start_text!r}, {end_text!r}"))
            continue
        if not (math.isfinite(start_s) and math.isfinite(end_s)):
            entries.append(Skip(source_row, ytid, MALFORMED, f"start/end must be finite, found {start_text!r}, "
                                                            f"{end_text!r}"))
            continue
        if not YTID_PATTERN.match(ytid) or start_s < 0 or end_s <= start_s:
            entries.append(Skip(source_row, ytid, MALFORMED,
                                f"expected a YouTube id and 0 <= start < end, found {ytid!r}, {start_s}, {end_s}"))
            continue
        key = clip_key(ytid, start_s)
        mids = tuple(m.strip() for m in mid_text.split(",") if m.strip())
        if not mids:  # AudioSet lists at least one label per segment; an empty field is a broken row, not a negative
            entries.append(Skip(source_row, key, MALFORMED, "no labels in the positive_labels field"))
            continue
        unknown = [m for m in mids if m not in classes.index_of_mid]
        if key in seen:
            entries.append(Skip(source_row, key, DUPLICATE, f"same YTID and start as {seen[key]}"))
            continue
        seen[key] = source_row
        if unknown:
            entries.append(Skip(source_row, key, UNKNOWN_LABEL,
                                f"MIDs not in the class label file: {' '.join(unknown)}"))
            continue
        stems = candidate_stems(ytid, start_s, end_s)
        path = audio.find(stems)
        if path is None:
            entries.append(Skip(source_row, key, MISSING, f"no audio file under {audio.audio_dir} named like "
                                f"{ytid}_{start_s:.3f}.*, {ytid}_{start_s:.3f}_{end_s:.3f}.* or {ytid}.*"))
            continue
        whole_video = path.stem in (ytid, f"Y{ytid}")
        entries.append(SourceRow(
            source_row=source_row, key=key, path=path, source_file=path.relative_to(audio.audio_dir).as_posix(),
            labels=tuple(classes.index_of_mid[m] for m in mids), mids=mids,
            extra={"ytid": ytid, "start_s": start_s, "end_s": end_s},
            span_s=(start_s, end_s) if whole_video else None,
        ))
    return _refuse_shared_videos(entries)


def _refuse_shared_videos(entries: list[SourceRow | Skip]) -> list[SourceRow | Skip]:
    """Rows that found the same bare `YTID.ext` file become `ambiguous file` skips: a file named by the video alone
    may be the whole video or one segment of it, and it cannot be both segments."""
    rows_of_file: dict[Path, list[str]] = {}
    for entry in entries:
        if isinstance(entry, SourceRow) and entry.span_s is not None:
            rows_of_file.setdefault(entry.path, []).append(entry.source_row)
    shared = {path: rows for path, rows in rows_of_file.items() if len(rows) > 1}
    return [
        Skip(entry.source_row, entry.key, AMBIGUOUS,
             f"{entry.source_file} is named by the video alone and rows {', '.join(shared[entry.path])} all map to "
             "it; name each segment's file YTID_START.ext")
        if isinstance(entry, SourceRow) and entry.path in shared else entry
        for entry in entries
    ]


def default_class_labels(segments: Sequence[Path]) -> Path:
    """The label file of an AudioSet-format directory: `class_labels_indices.csv` beside the first segment CSV when
    there is one, else the shipped 527-class file."""
    beside = Path(segments[0]).parent / LABEL_FILE_NAME
    return beside if beside.is_file() else default_label_file()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {TOOL}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--segments", type=Path, nargs="+", required=True,
                        help="AudioSet segment CSV(s): three '#' lines, then 'YTID, start, end, \"mid,mid\"' rows")
    parser.add_argument("--audio-dir", type=Path, required=True,
                        help="directory searched recursively for YTID_start.ext, YTID_start_end.ext or YTID.ext")
    parser.add_argument("--class-labels", type=Path, default=None,
                        help=f"class_labels_indices.csv (default: the {LABEL_FILE_NAME} beside the first --segments "
                             f"file, else the shipped 527-class file {default_label_file()})")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    for path in args.segments:
        if not path.is_file():
            parser.error(f"--segments: no such file {path}")
    if not args.audio_dir.is_dir():
        parser.error(f"--audio-dir: no such directory {args.audio_dir}")
    label_file = args.class_labels or default_class_labels(args.segments)
    try:
        classes = load_class_labels(label_file)
    except (ValueError, OSError) as error:  # the message names the file (and line)
        parser.error(f"--class-labels: {error}")
    print(f"class labels: {label_file} ({len(classes)} classes)")
    audio = AudioIndex(args.audio_dir)
    inputs = read_segments(args.segments, audio, classes)
    return run_cli(inputs, classes, args, tool=TOOL, labelled=True)


if __name__ == "__main__":
    sys.exit(main())
