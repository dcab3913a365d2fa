"""Learning-rate schedules, as `LambdaLR`s stepped once per optimiser step."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine(optimizer: Optimizer, total_steps: int, warmup_steps: int, final_lr_ratio: float = 0.1) -> LambdaLR:
    """Linear warm-up from 0 to the optimiser's lr over `warmup_steps`, then cosine decay to `final_lr_ratio` x lr
    at `total_steps` (CED: 0.1).

    Raises:
        ValueError: when the warm-up does not fit in the run (`warmup_steps >= total_steps`).
    """
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(
            f"warmup_steps={warmup_steps} must lie in [0, total_steps={total_steps}): lower "
            f"<stage>.optim.scheduler.warmup_steps or train longer"
        )
    if not 0.0 <= final_lr_ratio <= 1.0:
        raise ValueError(f"final_lr_ratio={final_lr_ratio} must lie in [0, 1]")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min((step - warmup_steps) / max(total_steps - warmup_steps - 1, 1), 1.0)
        return final_lr_ratio + (1.0 - final_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)
