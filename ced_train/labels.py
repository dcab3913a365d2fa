"""The AudioSet label file (`index,mid,display_name`) and lookups between indices, MIDs and display names."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

NUM_AUDIOSET_CLASSES = 527


@dataclass(frozen=True)
class ClassLabels:
    """Class table in index order: `mids[i]` and `names[i]` describe output `i` of a model."""

    mids: tuple[str, ...]
    names: tuple[str, ...]
    index_of_mid: dict[str, int] = field(repr=False)

    def __len__(self) -> int:
        return len(self.mids)


def default_label_file() -> Path:
    """The AudioSet `class_labels_indices.csv` shipped inside the package (527 classes)."""
    return Path(str(resources.files("ced_train") / "resources" / "class_labels_indices.csv"))


def load_class_labels(path: str | Path | None = None) -> ClassLabels:
    """Read a label file in AudioSet's format; `None` reads the shipped AudioSet file.

    Raises:
        ValueError: naming the file and line when the header, an index or a MID is wrong.
    """
    path = Path(path) if path is not None else default_label_file()
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:  # a byte-order mark, as spreadsheets write, is dropped
            rows = list(csv.reader(handle))
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    if not rows or [c.strip() for c in rows[0]] != ["index", "mid", "display_name"]:
        raise ValueError(f"{path}: expected header 'index,mid,display_name', found {rows[:1]}")
    mids: list[str] = []
    names: list[str] = []
    for line_no, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != 3:
            raise ValueError(f"{path}:{line_no}: expected 3 columns, found {len(row)}: {row}")
        index, mid, name = (c.strip() for c in row)
        if not index.isdigit() or int(index) != len(mids):
            raise ValueError(f"{path}:{line_no}: expected index {len(mids)}, found {index!r}")
        if mid in mids:
            raise ValueError(f"{path}:{line_no}: duplicate MID {mid!r}")
        mids.append(mid)
        names.append(name)
    return ClassLabels(tuple(mids), tuple(names), {mid: i for i, mid in enumerate(mids)})


def display_names(path: str | Path) -> list[str]:
    """Display names in output order from a label file, or from a shard directory (its `manifest.json` class table:
    the classes a model trained on those shards outputs)."""
    path = Path(path)
    if path.is_dir():
        from ced_train.data.manifest import read_manifest

        return list(read_manifest(path, check_files=False).class_names)
    return list(load_class_labels(path).names)
