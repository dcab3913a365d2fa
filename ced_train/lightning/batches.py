"""Training batches: what the views are rendered from with the targets of one kind of training, and nothing else.

A distillation batch carries the teachers' stored top-k and no labels, so a distillation loss cannot read labels.
The views themselves are rendered on the training device from `inputs` (`rendering.ViewRenderer`), inside the
training step. Lightning moves dataclass batches to the device field by field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ced_train.rendering import ViewInputs


def _pinned(batch):
    """A copy of a batch dataclass with its tensors (and `ViewInputs`) in pinned memory."""
    def pin(value):
        return value.pin_memory() if isinstance(value, torch.Tensor | ViewInputs) else value

    return dataclasses.replace(batch, **{field.name: pin(getattr(batch, field.name))
                                         for field in dataclasses.fields(batch)})


@dataclass
class SupervisedBatch:
    """inputs: the views (`ViewInputs`, rendered to `(batch, 64, frames)` log-mel dB before the model's mel
    BatchNorm); labels: `(batch, classes)` float32 multi-hot labels, mixed like the inputs for mixed views; keys: each
    view's chunk (`chunks.chunk_rng_key`: the sample key for a first chunk, `key#chunk` for the others)."""

    inputs: ViewInputs
    labels: torch.Tensor
    keys: list[str]

    def __len__(self) -> int:
        return len(self.keys)

    pin_memory = _pinned  # called by DataLoader(pin_memory=True)


@dataclass
class DistillBatch:
    """inputs: the views (`ViewInputs`); topk_values: `(batch, k)` float32 ensemble probabilities of those same
    views; topk_indices: `(batch, k)` int64 class indices; views: `(batch,)` int64 store view each row was read
    from; keys: each view's chunk, as in `SupervisedBatch`."""

    inputs: ViewInputs
    topk_values: torch.Tensor
    topk_indices: torch.Tensor
    views: torch.Tensor
    keys: list[str]

    def __len__(self) -> int:
        return len(self.keys)

    pin_memory = _pinned
