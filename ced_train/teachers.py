"""The teacher ensemble of the teacher pass: any models that map a log-mel input to class logits, averaged.

A teacher is anything with `num_classes` and `__call__(mel_db (batch, 64, frames) float32 dB) -> (batch, classes)
logits` (the `Teacher` protocol): checkpoints of any registered model (CED, or a timm CNN on the same front end, as
the file describes it) are wrapped by `TaggerTeacher`, and an ensemble may mix them; another architecture needs only
a small wrapper that returns its pre-sigmoid outputs (or `torch.logit` of its probabilities).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

AVERAGING = ("probs", "logits")


class Teacher(Protocol):
    """`(batch, 64, frames)` float32 log-mel dB (before any mel normalisation) → `(batch, num_classes)` logits."""

    num_classes: int

    def __call__(self, mel_db: torch.Tensor) -> torch.Tensor: ...


class TaggerTeacher(nn.Module):
    """A model of this project (`CEDModel`, `CNNTagger`) as a teacher: `forward_spectrogram` with the head's raw
    logits (pooling "logit").

    Args:
        model: its pooling is switched to "logit" (the released models' probabilities are the sigmoid of exactly
            these logits).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        model.pooling = "logit"
        self.model = model.eval()
        self.num_classes = model.num_classes

    def forward(self, mel_db: torch.Tensor) -> torch.Tensor:
        return self.model.forward_spectrogram(mel_db)


class TeacherEnsemble(nn.Module):
    """Averages teachers' outputs: probabilities (default, as CED) or logits (then a sigmoid).

    Args:
        teachers: `Teacher`s with equal `num_classes`.
        averaging: "probs" or "logits".
        sources: one description per teacher (`{"file", "sha256", "bytes"}`), recorded in the store.
        name: a label for the ensemble.

    Forward: `(batch, 64, frames)` float32 log-mel dB → `(batch, classes)` float32 probabilities.
    """

    def __init__(
        self,
        teachers: Sequence[Teacher],
        averaging: str = "probs",
        sources: Sequence[dict] = (),
        name: str = "ensemble",
    ) -> None:
        super().__init__()
        if not teachers:
            raise ValueError("a teacher ensemble needs at least one teacher")
        if averaging not in AVERAGING:
            raise ValueError(f"averaging must be one of {AVERAGING}, got {averaging!r}")
        sources = list(sources) or [{"file": type(teacher).__name__} for teacher in teachers]
        classes = [teacher.num_classes for teacher in teachers]
        if len(set(classes)) != 1:
            found = ", ".join(f"{source.get('file')}: {count}" for source, count in zip(sources, classes, strict=True))
            raise ValueError(f"teachers disagree on the number of classes ({found})")
        self.teachers = nn.ModuleList(t if isinstance(t, nn.Module) else _Wrapped(t) for t in teachers)
        self.averaging = averaging
        self.sources = sources
        self.num_classes = teachers[0].num_classes
        self.name = name

    @torch.no_grad()
    def forward(self, mel_db: torch.Tensor) -> torch.Tensor:
        logits = torch.stack([teacher(mel_db).float() for teacher in self.teachers])
        if self.averaging == "probs":
            return logits.sigmoid().mean(0)
        return logits.mean(0).sigmoid()


class _Wrapped(nn.Module):
    """Holds a non-Module teacher so the ensemble can move and iterate it like the others."""

    def __init__(self, teacher: Teacher) -> None:
        super().__init__()
        self.teacher = teacher
        self.num_classes = teacher.num_classes

    def forward(self, mel_db: torch.Tensor) -> torch.Tensor:
        return self.teacher(mel_db)


def describe_checkpoint(path: str | Path) -> dict:
    """`{"file": name, "sha256": hex, "bytes": size}` of a checkpoint file, as recorded in the store; for an HF-layout
    directory, of its `config.json` and weights file read in that order, named by the directory."""
    from ced_train.models.hf import hf_directory, hf_files

    path = Path(path)
    directory = hf_directory(path)
    files = hf_files(directory) if directory is not None else [path]
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as handle:
            while block := handle.read(1 << 22):
                digest.update(block)
    return {"file": (directory or path).name, "sha256": digest.hexdigest(), "bytes": sum(f.stat().st_size for f in files)}


def load_ensemble(
    checkpoints: Sequence[str | Path], averaging: str = "probs", name: str | None = None, trust: bool = False
) -> TeacherEnsemble:
    """Load teacher checkpoints (official CED files, bare state dicts, or this project's exports of any registered
    model) as an ensemble in eval mode.

    Args:
        checkpoints: teacher checkpoint files, in ensemble order.
        averaging: "probs" (default) or "logits".
        name: a label for the ensemble (used in store paths); default: the checkpoint stems joined by "+".
        trust: allow full unpickling of files the safe loader refuses (`load_checkpoint`).

    Raises:
        CheckpointError: a file cannot be loaded. ValueError: the teachers have different numbers of classes.
    """
    from ced_train.models import load_checkpoint

    if not checkpoints:
        raise ValueError("teachers.checkpoints is empty: list at least one teacher checkpoint")
    teachers = [TaggerTeacher(load_checkpoint(path, trust=trust)) for path in checkpoints]
    sources = [describe_checkpoint(path) for path in checkpoints]
    name = name or "+".join(Path(path).stem for path in checkpoints)
    return TeacherEnsemble(teachers, averaging, sources, name).eval()
