"""Host → device copies of batches: from pinned memory and asynchronous wherever the device allows, so the host
queues step n+1 while the device still runs step n."""

from __future__ import annotations

import torch

# Lightning's rule for bare tensors too: no asynchronous copy to the CPU (nothing to overlap) nor to MPS (a race,
# pytorch/pytorch#83015).
_SYNCHRONOUS_DEVICE_TYPES = ("cpu", "mps")


def copies_async(device: torch.device | str, non_blocking: bool | None = None) -> bool:
    """`non_blocking` for a copy to `device`: as given, or (None) True for every device but the CPU and MPS."""
    if non_blocking is not None:
        return non_blocking
    return torch.device(device).type not in _SYNCHRONOUS_DEVICE_TYPES


def pins_memory(device: torch.device | str) -> bool:
    """Whether a DataLoader feeding `device` should pin its batches (page-locked host memory is what lets a CUDA
    copy run asynchronously)."""
    return torch.device(device).type == "cuda"
