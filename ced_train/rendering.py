"""Views rendered on the training device: what a batch of views is made from (`ViewInputs`, built by the loader
workers with `collate_views`), and the module that turns it into model inputs (`ViewRenderer`: the CED front end and
`augment.apply`, batched).

Loader workers only read and decode: they ship each batch's distinct waveforms once (a view's own clip and its mixup
partner, often a batch-mate, share the batch's rows) with the view parameters, and the teacher pass and the student
both render with `ViewRenderer` on their device. On one device type the two render bit-identical views: the front end
computes each clip's log-mel (with its own dB floor) independently of the batch, and `apply` is element-wise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import get_worker_info

from ced_train.augment import VIEW_PARAMS_DTYPE, apply
from ced_train.models.frontend import LogMelFrontEnd
from ced_train.transfer import copies_async

PCM_SCALE = 32768.0  # int16 samples / 32768 = the float waveform the shards decode to (exact in float32)


@dataclass
class ViewInputs:
    """What a batch of `n` views is rendered from.

    waveforms: `(clips, samples)` int16 fixed-length chunks of the distinct clips the views need (their own clips and
        their mixup partners), `samples = AugmentConfig.clip_samples`; the waveform is `waveforms / 32768`.
    clip: `(n,)` int64 row of `waveforms` each view renders.
    partner: `(n,)` int64 row of its mixup partner (its own row when it has none).
    params: one `(n,)` int64 tensor per field of `augment.VIEW_PARAMS_DTYPE` (`params_to_columns`), checked.
    fill_db: the value of masked cells (`AugmentConfig.mask_fill_db`).
    """

    waveforms: torch.Tensor
    clip: torch.Tensor
    partner: torch.Tensor
    params: dict[str, torch.Tensor]
    fill_db: float

    def __len__(self) -> int:
        return self.clip.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool | None = None) -> ViewInputs:
        """The inputs on `device`; `non_blocking=None` (what Lightning passes: nothing) is `transfer.copies_async`."""
        non_blocking = copies_async(device, non_blocking)

        def move(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.to(device, non_blocking=non_blocking)

        return ViewInputs(move(self.waveforms), move(self.clip), move(self.partner),
                          {name: move(column) for name, column in self.params.items()}, self.fill_db)

    def pin_memory(self) -> ViewInputs:  # called by DataLoader(pin_memory=True)
        return ViewInputs(self.waveforms.pin_memory(), self.clip.pin_memory(), self.partner.pin_memory(),
                          {name: column.pin_memory() for name, column in self.params.items()}, self.fill_db)


def collate_views(items: Sequence[dict]) -> ViewInputs:
    """`ViewDataset` items → their `ViewInputs`, each distinct clip (by shard and row) shipped once."""
    rows: dict[tuple[str, int], int] = {}
    waveforms: list[np.ndarray] = []

    def row_of(shard: str, row: int, waveform: np.ndarray) -> int:
        if (shard, row) not in rows:
            rows[shard, row] = len(waveforms)
            waveforms.append(waveform)
        return rows[shard, row]

    clip = [row_of(item["shard"], item["row"], item["waveform"]) for item in items]
    partner = [row_of(item["shard"], item["partner_row"], item["partner_waveform"]) for item in items]
    fill = {item["fill_db"] for item in items}
    if len(fill) != 1:
        raise ValueError(f"views of one batch with different mask fill values {sorted(fill)}")
    return ViewInputs(
        waveforms=_stack(waveforms),
        clip=torch.tensor(clip),
        partner=torch.tensor(partner),
        params={name: torch.tensor([item["params"][name] for item in items]) for name in VIEW_PARAMS_DTYPE.names},
        fill_db=fill.pop(),
    )


def _stack(waveforms: list[np.ndarray]) -> torch.Tensor:
    """`(clips, samples)` int16 tensor of the chunks; in a DataLoader worker, written straight into shared memory
    (as torch's default collate does), so that handing the batch to the main process copies nothing."""
    shape = (len(waveforms), *waveforms[0].shape)
    if get_worker_info() is None:
        out = torch.empty(shape, dtype=torch.int16)
    else:
        storage = torch.UntypedStorage._new_shared(math.prod(shape) * 2)
        out = torch.empty(0, dtype=torch.int16).set_(storage).view(shape)
    np.stack(waveforms, out=out.numpy())
    return out


class ViewRenderer(nn.Module):
    """`ViewInputs` → `(n, 64, frames)` float32 augmented log-mel dB, on the inputs' device.

    Always float32 and without gradients, also under autocast. Holds no state of its own (the front end's buffers
    are not persistent), so it adds nothing to a checkpoint.
    """

    def __init__(self) -> None:
        super().__init__()
        self.front_end = LogMelFrontEnd()

    @torch.no_grad()
    def forward(self, inputs: ViewInputs) -> torch.Tensor:
        with torch.autocast(device_type=inputs.waveforms.device.type, enabled=False):
            mel_db = self.log_mel(inputs.waveforms.float() / PCM_SCALE)
            return apply(mel_db[inputs.clip], inputs.params, mel_db[inputs.partner], inputs.fill_db)

    def log_mel(self, waveforms: torch.Tensor) -> torch.Tensor:
        """`(clips, samples)` float32 → `(clips, 64, frames)` dB. On a CPU one clip at a time: the same bits, twice as
        fast as the whole batch at once (one clip's spectrogram stays in cache); on an accelerator batched."""
        if waveforms.device.type == "cpu":
            return torch.cat([self.front_end(waveform[None]) for waveform in waveforms])
        return self.front_end(waveforms)
