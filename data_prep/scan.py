"""Finding the audio files below a directory, symlinked subdirectories included."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from ced_train.audio import AUDIO_EXTENSIONS


def audio_files(root: Path) -> Iterator[Path]:
    """Audio files (by extension, `ced_train.audio.AUDIO_EXTENSIONS`) below `root`, directories in sorted order,
    as paths under `root` (a symlinked subdirectory's files keep the link's path). Symlinked directories are
    followed; a directory reached again (a link loop, or two links to one directory) is walked only the first time."""
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        status = os.stat(dirpath)
        if (status.st_dev, status.st_ino) in seen:
            dirnames.clear()
            continue
        seen.add((status.st_dev, status.st_ino))
        dirnames.sort()
        for filename in sorted(filenames):
            if os.path.splitext(filename)[1].lower() in AUDIO_EXTENSIONS:
                yield Path(dirpath) / filename
