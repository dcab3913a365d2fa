"""CNN taggers: a timm convolutional trunk (MobileNetV3, EfficientNet, ResNet, ...) on CED's log-mel front end.

Teachers that learn from a few hundred clips in minutes: convolutions bring the locality a transformer trained from
scratch must first learn. The model keeps CED's interface (`forward(waveform)`, `forward_spectrogram(mel_db)`,
`pooling`, `num_classes`, the head under `outputlayer.1`), so it trains, teaches, evaluates and tags wherever a CED
model does, and its checkpoints say which trunk they hold (`build_kwargs`).

Unlike CED, any input length runs in one pass (no 10 s chunking): the pooling below is global over time.
"""

from __future__ import annotations

import timm
import torch
from timm.layers import trunc_normal_
from torch import nn

from ced_train.models.frontend import N_MELS, LogMelFrontEnd

POOLINGS = ("mean", "logit")
# The trunks downsample by 32: shorter inputs are zero-padded (after normalisation) to one such cell.
_MIN_FRAMES = 32


class CNNTagger(nn.Module):
    """Log-mel front end, mel BatchNorm (as CED's), a timm CNN trunk with one input channel, mean over frequency,
    max + mean over time (PANNs' clip pooling: short events stand out, long ones still count), dropout and a
    linear head.

    Args:
        arch: a timm architecture with a feature trunk (`features_only`), e.g. "mobilenetv3_small_100",
            "efficientnet_b0", "resnet18"; built with random weights (nothing is downloaded).
        num_classes: outputs of the head.
        pooling: "mean" returns sigmoid probabilities, "logit" raw logits (for training with BCE-with-logits).
        drop_rate: dropout before the head.
        drop_path_rate: stochastic depth of the trunk, where the architecture has it.

    Forward: `(batch, samples)` float32 waveform at 16 kHz → `(batch, num_classes)` probabilities or logits.
    """

    def __init__(
        self,
        arch: str,
        num_classes: int = 527,
        pooling: str = "mean",
        drop_rate: float = 0.2,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if arch not in timm.list_models():
            raise ValueError(f"unknown timm architecture {arch!r} (see timm.list_models())")
        self.arch = arch
        self.num_classes = num_classes
        self.pooling = pooling
        self.front_end = LogMelFrontEnd()
        self.init_bn = nn.Sequential(nn.Identity(), nn.BatchNorm2d(N_MELS, momentum=0.01))
        # Only the last stage's features: no head or unused layers in the trunk (DDP requires every parameter used).
        extra = {"drop_path_rate": drop_path_rate} if drop_path_rate else {}
        self.trunk = timm.create_model(arch, pretrained=False, in_chans=1, features_only=True, out_indices=(-1,),
                                       **extra)
        features = self.trunk.feature_info.channels()[-1]
        self.outputlayer = nn.Sequential(nn.Dropout(drop_rate), nn.Linear(features, num_classes))
        # Small initial logits, as CED's head: the trunk's pooled activations are large at random initialisation.
        trunc_normal_(self.outputlayer[1].weight, std=0.02)
        nn.init.zeros_(self.outputlayer[1].bias)

    @property
    def build_kwargs(self) -> dict:
        """Constructor arguments besides the registry name that a checkpoint must record to rebuild this model."""
        return {"arch": self.arch}

    def no_weight_decay(self) -> set[str]:
        return set()

    def forward_spectrogram(self, mel_db: torch.Tensor) -> torch.Tensor:
        """`(batch, mels, frames)` log-mel dB → `(batch, num_classes)` probabilities ("mean") or logits ("logit")."""
        spec = self.init_bn(mel_db.unsqueeze(2)).transpose(1, 2)  # BatchNorm over mel bins → (batch, 1, mels, frames)
        spec = nn.functional.pad(spec, (0, max(_MIN_FRAMES - spec.shape[-1], 0)))
        features = self.trunk(spec)[-1].mean(2)  # (batch, channels, frames / 32)
        logits = self.outputlayer(features.amax(-1) + features.mean(-1))
        return logits.sigmoid() if self.pooling == "mean" else logits

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return self.forward_spectrogram(self.front_end(waveform))
