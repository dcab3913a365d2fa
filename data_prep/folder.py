"""Any folder of audio → webdataset shards, with or without labels (distillation needs none).

    python -m data_prep.folder --audio-dir DIR [--labels TSV] [--class-labels CSV] --out shards/NAME

Without `--labels`, every audio file under DIR (recursively) is one input row, written with no labels. With `--labels`,
the TSV lists the rows: `relative/path.wav<TAB>/m/09x0r,/t/dd00088` (MIDs of the class label file; an empty second
field means "none of the classes"; blank and `#` lines are ignored); files it does not list are left out and counted.
Sample keys are the relative path without extension, with `/` as `__` and other characters outside `[A-Za-z0-9_-]`
as `_`; names that collide that way, and names that end like the key of a piece of a long file (`-p` and digits,
see `data_prep.sharding`), get a short hash of their path appended.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from ced_train.data.manifest import Skip
from ced_train.labels import ClassLabels, default_label_file, load_class_labels
from data_prep.scan import audio_files
from data_prep.sharding import (
    DUPLICATE,
    MALFORMED,
    MISSING,
    PIECE_SUFFIX,
    UNKNOWN_LABEL,
    SourceRow,
    add_output_arguments,
    run_cli,
)

TOOL = "data_prep.folder"
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def list_audio_files(audio_dir: Path) -> list[str]:
    """Relative POSIX paths of the audio files under `audio_dir` (symlinked subdirectories included), sorted."""
    return sorted(path.relative_to(audio_dir).as_posix() for path in audio_files(audio_dir))


def keys_for_paths(relative_paths: Sequence[str]) -> dict[str, str]:
    """Relative path → sample key, unique, free of dots and never a piece key (see the module docstring)."""
    def plain(path: str) -> str:
        stem = path.rsplit(".", 1)[0] if "." in path.rsplit("/", 1)[-1] else path
        return _UNSAFE.sub("_", stem.replace("/", "__")) or "_"

    plain_keys = {path: plain(path) for path in relative_paths}
    collisions = Counter(plain_keys.values())
    return {path: key if collisions[key] == 1 and not PIECE_SUFFIX.search(key)
            else f"{key}-{hashlib.sha1(path.encode()).hexdigest()[:8]}" for path, key in plain_keys.items()}


def read_label_tsv(tsv_path: Path) -> list[tuple[str, str, str | None]]:
    """`(source_row, relative path, mid field)` per data line; a line without a tab has mid field None."""
    rows = []
    for line_no, line in enumerate(tsv_path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        path, tab, mids = line.partition("\t")
        rows.append((f"{tsv_path.name}:{line_no}", path.strip(), mids.strip() if tab else None))
    return rows


def folder_inputs(audio_dir: Path, classes: ClassLabels, labels_tsv: Path | None) -> tuple[list[SourceRow | Skip], int]:
    """Input rows for `audio_dir`, and how many audio files the label TSV leaves out (0 without one)."""
    files = list_audio_files(audio_dir)
    if labels_tsv is None:
        keys = keys_for_paths(files)
        return [SourceRow(path, keys[path], audio_dir / path, path) for path in files], 0
    listed = read_label_tsv(labels_tsv)
    keys = keys_for_paths(sorted({path for _, path, _ in listed}))
    inputs: list[SourceRow | Skip] = []
    seen: dict[str, str] = {}
    for source_row, path, mid_field in listed:
        key = keys[path]
        if mid_field is None:
            inputs.append(Skip(source_row, key, MALFORMED, "expected 'relative/path<TAB>mid,mid'"))
            continue
        if path in seen:
            inputs.append(Skip(source_row, key, DUPLICATE, f"{path} is also listed at {seen[path]}"))
            continue
        seen[path] = source_row
        mids = tuple(m.strip() for m in mid_field.split(",") if m.strip())
        unknown = [m for m in mids if m not in classes.index_of_mid]
        if unknown:
            inputs.append(Skip(source_row, key, UNKNOWN_LABEL,
                               f"MIDs not in the class label file: {' '.join(unknown)}"))
        elif not (audio_dir / path).is_file():
            inputs.append(Skip(source_row, key, MISSING, f"no file {path} under {audio_dir}"))
        else:
            inputs.append(SourceRow(source_row, key, audio_dir / path, path,
                                    tuple(classes.index_of_mid[m] for m in mids), mids))
    return inputs, len(set(files) - set(seen))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {TOOL}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--audio-dir", type=Path, required=True, help="directory searched recursively for audio")
    parser.add_argument("--labels", type=Path, default=None, help="TSV 'relative/path<TAB>mid,mid' (optional)")
    parser.add_argument("--class-labels", type=Path, default=None,
                        help=f"class_labels_indices.csv (default: the shipped 527-class file {default_label_file()})")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    if not args.audio_dir.is_dir():
        parser.error(f"--audio-dir: no such directory {args.audio_dir}")
    if args.labels is not None and not args.labels.is_file():
        parser.error(f"--labels: no such file {args.labels}")
    try:
        classes = load_class_labels(args.class_labels)
    except (ValueError, OSError) as error:  # the message names the file (and line)
        parser.error(f"--class-labels: {error}")
    inputs, unlisted = folder_inputs(args.audio_dir, classes, args.labels)
    if unlisted:
        print(f"{TOOL}: {unlisted} audio files under {args.audio_dir} are not listed in {args.labels} and are left out",
              file=sys.stderr)
    return run_cli(inputs, classes, args, tool=TOOL, labelled=args.labels is not None)


if __name__ == "__main__":
    sys.exit(main())
