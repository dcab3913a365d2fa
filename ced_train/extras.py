"""The optional extras of pyproject.toml (`export`, `official`, `slurm`) and the one rule for a feature that needs one:
`require` imports what the feature imports, before the feature writes anything, and a missing module becomes a
`MissingExtra` whose message is one line naming the pip command; each CLI prints it as `error: ...` and exits 2."""

from __future__ import annotations

import importlib


class MissingExtra(Exception):
    """A feature needs an optional extra that is not installed. `str()` is one line: the feature, the extra, the pip
    command and the module that could not be imported."""


def require(extra: str, *modules: str, feature: str) -> None:
    """Import `modules` (dotted names, in order); raise MissingExtra naming `extra` at the first that cannot be
    imported. `feature` says what needs them, as the start of a sentence ("ONNX export")."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as error:
            missing = getattr(error, "name", None) or name
            raise MissingExtra(f"{feature} needs the '{extra}' extra: pip install 'ced-train[{extra}]' "
                               f"(missing module {missing})") from None
