"""The CED audio transformer on timm layers, with the official parameter names so official state dicts load.

Deviations from the official implementation (RicherMans/CED `models/audiotransformer.py`), all deliberate:

1. The 120 dB floor of the front end is per clip, not per batch (see `frontend.py`), so a clip's input never depends
   on its batch-mates. At batch size 1 both agree exactly.
2. Inputs shorter than one patch (16 frames, < 0.15 s) are zero-padded after the mel BatchNorm instead of failing.
3. An input of an exact multiple of the positional table's length keeps its last chunk; the official code drops it
   (its `else` branch stacks `splits[:-1]`), silently ignoring up to half of such a clip.
"""

from __future__ import annotations

from functools import partial

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from ced_train.models.frontend import N_MELS, LogMelFrontEnd

POOLINGS = ("mean", "logit")


class PatchEmbed(nn.Module):
    """Non-overlapping `patch_size` x `patch_size` patches of a `(batch, 1, mels, frames)` spectrogram.

    Output: `(batch, embed_dim, mels // patch, frames // patch)`; trailing frames that do not fill a patch are
    dropped, as in the official model.
    """

    def __init__(self, embed_dim: int, patch_size: int = 16) -> None:
        super().__init__()
        self.proj = nn.Conv2d(1, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        return self.proj(spec)


class CEDModel(nn.Module):
    """CED audio tagger: log-mel front end, mel BatchNorm, 16x16 patches, time/frequency positional embeddings,
    a stack of timm transformer blocks, mean pooling of tokens and a linear head.

    Args:
        num_classes: outputs of the head (527 for AudioSet).
        embed_dim, depth, num_heads, mlp_ratio: transformer dimensions.
        patch_size: square patch side in frames and mel bins.
        target_length: frames covered by the time positional table (1012 ≈ 10.1 s); longer inputs are split into
            chunks of this length whose outputs are averaged.
        pooling: "mean" returns sigmoid probabilities, "logit" raw logits (for training with BCE-with-logits).
        drop_rate, attn_drop_rate, drop_path_rate: regularisation (0 at inference).

    Forward: `(batch, samples)` float32 waveform at 16 kHz → `(batch, num_classes)` probabilities or logits.
    """

    def __init__(
        self,
        num_classes: int = 527,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        patch_size: int = 16,
        target_length: int = 1012,
        pooling: str = "mean",
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.target_length = target_length
        self.pooling = pooling

        self.front_end = LogMelFrontEnd()
        # Official name `init_bn.1`: BatchNorm over mel bins, held at index 1 as in the official Sequential.
        self.init_bn = nn.Sequential(nn.Identity(), nn.BatchNorm2d(N_MELS, momentum=0.01))
        self.patch_embed = PatchEmbed(embed_dim, patch_size)
        self.time_pos_embed = nn.Parameter(torch.randn(1, embed_dim, 1, target_length // patch_size) * 0.02)
        self.freq_pos_embed = nn.Parameter(torch.randn(1, embed_dim, N_MELS // patch_size, 1) * 0.02)
        self.pos_drop = nn.Dropout(drop_rate)
        drop_path_rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.Sequential(
            *(
                Block(
                    dim=embed_dim,
                    num_heads=num_heads,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=True,
                    proj_drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=rate,
                    norm_layer=partial(nn.LayerNorm, eps=1e-6),
                    act_layer=nn.GELU,
                )
                for rate in drop_path_rates
            )
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.outputlayer = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, num_classes))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"time_pos_embed", "freq_pos_embed"}

    def normalise(self, mel_db: torch.Tensor) -> torch.Tensor:
        """Mel BatchNorm: `(batch, mels, frames)` dB → `(batch, 1, mels, frames)` normalised."""
        # BatchNorm2d over mel bins: put mels on the channel axis, as the official rearrange does.
        return self.init_bn(mel_db.unsqueeze(2)).transpose(1, 2)

    def forward_features(self, spec: torch.Tensor) -> torch.Tensor:
        """`(batch, 1, mels, frames <= target_length)` → `(batch, tokens, embed_dim)` after the final norm."""
        tokens = self.patch_embed(spec)
        tokens = tokens + self.time_pos_embed[..., : tokens.shape[-1]] + self.freq_pos_embed
        tokens = self.pos_drop(tokens.flatten(2).transpose(1, 2))
        return self.norm(self.blocks(tokens))

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        """`(batch, tokens, embed_dim)` → `(batch, num_classes)` probabilities ("mean") or logits ("logit")."""
        logits = self.outputlayer(tokens.mean(1))
        return logits.sigmoid() if self.pooling == "mean" else logits

    def forward_spectrogram(self, mel_db: torch.Tensor) -> torch.Tensor:
        """`(batch, mels, frames)` log-mel dB → `(batch, num_classes)`.

        Inputs longer than `target_length` frames are split into chunks of that length (the last zero-padded after
        BatchNorm), run as one batch, and the chunk outputs averaged. Written without data-dependent branches, so
        the graph exports with a dynamic time axis: an input that fits the table is one chunk of its own length.
        """
        spec = self.normalise(mel_db)
        batch, frames = spec.shape[0], spec.shape[-1]
        spec = nn.functional.pad(spec, (0, torch.sym_max(self.patch_size - frames, 0)))
        frames = torch.sym_max(frames, self.patch_size)
        chunk_frames = torch.sym_min(frames, self.target_length)
        num_chunks = (frames + self.target_length - 1) // self.target_length
        spec = nn.functional.pad(spec, (0, num_chunks * chunk_frames - frames))
        chunks = spec.reshape(batch, 1, spec.shape[2], num_chunks, chunk_frames).permute(3, 0, 1, 2, 4)
        outputs = self.forward_head(self.forward_features(chunks.reshape(num_chunks * batch, 1, -1, chunk_frames)))
        return outputs.reshape(num_chunks, batch, -1).mean(0)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return self.forward_spectrogram(self.front_end(waveform))
