"""Training batches: augmented model inputs with the targets of one kind of training, and nothing else.

A distillation batch carries the teachers' stored top-k and no labels, so a distillation loss cannot read labels.
Lightning moves dataclass batches to the device field by field.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SupervisedBatch:
    """mel_db: `(batch, 64, frames)` augmented log-mel in dB (before the model's mel BatchNorm);
    labels: `(batch, classes)` float32 multi-hot labels, mixed like the inputs for mixed views."""

    mel_db: torch.Tensor
    labels: torch.Tensor
    keys: list[str]

    def __len__(self) -> int:
        return len(self.keys)


@dataclass
class DistillBatch:
    """mel_db: `(batch, 64, frames)` augmented log-mel in dB; topk_values: `(batch, k)` float32 ensemble
    probabilities of that same view; topk_indices: `(batch, k)` int64 class indices; views: `(batch,)` int64 store
    view each row was read from."""

    mel_db: torch.Tensor
    topk_values: torch.Tensor
    topk_indices: torch.Tensor
    views: torch.Tensor
    keys: list[str]

    def __len__(self) -> int:
        return len(self.keys)
