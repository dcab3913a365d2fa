"""Training losses. Each takes the student's logits and the batch, and reads only the targets it is meant to:
`LabelBCE` the labels, the distillation losses the teachers' stored top-k (a distillation batch holds no labels)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ced_train.lightning.batches import DistillBatch, SupervisedBatch

FILLS = ("zero", "mean_rest")


def dense_targets(values: torch.Tensor, indices: torch.Tensor, num_classes: int, fill: str) -> torch.Tensor:
    """`(batch, k)` teacher probabilities and class indices → `(batch, num_classes)` float32 targets.

    Classes outside the top-k get `fill`: "zero" (CED's default) or "mean_rest": the smallest top-k probability
    spread over the `num_classes - k` other classes, CED's `last_mean` target (RicherMans/CED `dataset.py`), an
    upper bound of what each of them can hold on average.
    """
    if fill not in FILLS:
        raise ValueError(f"fill must be one of {FILLS}, got {fill!r}")
    values = values.float()
    if fill == "zero":
        rest = torch.zeros(values.shape[0], 1, dtype=values.dtype, device=values.device)
    else:
        rest = values.min(dim=1, keepdim=True).values / max(num_classes - values.shape[1], 1)
    dense = rest.expand(values.shape[0], num_classes).clone()
    return dense.scatter_(1, indices.long(), values)


class LabelBCE(nn.Module):
    """BCE-with-logits on multi-hot labels (mixed labels for mixed views)."""

    def forward(self, logits: torch.Tensor, batch: SupervisedBatch) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits.float(), batch.labels.float())


class TopKBCE(nn.Module):
    """CED's distillation loss: BCE-with-logits on the teachers' probabilities, top-k scattered, rest `fill`ed.

    Args:
        fill: "zero" or "mean_rest" (see `dense_targets`).
    """

    def __init__(self, fill: str = "zero") -> None:
        super().__init__()
        if fill not in FILLS:
            raise ValueError(f"loss fill must be one of {FILLS}, got {fill!r}")
        self.fill = fill

    def forward(self, logits: torch.Tensor, batch: DistillBatch) -> torch.Tensor:
        targets = dense_targets(batch.topk_values, batch.topk_indices, logits.shape[-1], self.fill)
        return F.binary_cross_entropy_with_logits(logits.float(), targets)


class TopKKL(nn.Module):
    """KL(teacher || student) between softmax distributions over classes at `temperature`, scaled by T² (Hinton
    et al. 2015). The teacher's logits are the log-odds of its filled dense probabilities.

    Args:
        fill: "zero" or "mean_rest" (see `dense_targets`); zero-filled classes get no teacher mass.
        temperature: softmax temperature T applied to both sides.
    """

    def __init__(self, fill: str = "zero", temperature: float = 2.0) -> None:
        super().__init__()
        if fill not in FILLS:
            raise ValueError(f"loss fill must be one of {FILLS}, got {fill!r}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.fill = fill
        self.temperature = temperature

    def forward(self, logits: torch.Tensor, batch: DistillBatch) -> torch.Tensor:
        probs = dense_targets(batch.topk_values, batch.topk_indices, logits.shape[-1], self.fill)
        # Clamped so that zero-filled classes get a finite, vanishing log-odds instead of -inf (NaN in softmax).
        eps = torch.finfo(torch.float32).eps
        teacher_logits = torch.logit(probs.clamp(eps, 1 - eps))
        teacher = F.log_softmax(teacher_logits / self.temperature, dim=-1)
        student = F.log_softmax(logits.float() / self.temperature, dim=-1)
        return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * self.temperature**2
