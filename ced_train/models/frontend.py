"""Log-mel front end of CED in pure torch.

Numerically equal to torchaudio's `MelSpectrogram(sample_rate=16000, n_fft=512, win_length=512, hop_length=160,
f_min=0, f_max=8000, n_mels=64, center=True, pad_mode="reflect", power=2, norm=None, mel_scale="htk")` followed by
`AmplitudeToDB(stype="power", top_db=120)`, with one deliberate deviation: the 120 dB floor is taken per clip, whereas
torchaudio takes it over the whole (batch, mel, frame) tensor, which lets one loud clip change a quiet clip's input.
Proven against a torchaudio fixture in `tests/test_parity.py`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ced_train.audio import SAMPLE_RATE

# The front-end grid that the model, the augmentation parameters and the teacher store share: 10 ms frames, 64 bins.
N_FFT = 512
HOP_SAMPLES = 160
N_MELS = 64


def num_frames(num_samples: int, n_fft: int = N_FFT, hop_samples: int = HOP_SAMPLES) -> int:
    """Frames the front end gives for `num_samples` input samples: centred framing, with inputs shorter than
    `n_fft // 2 + 1` samples zero-padded to that length first (10 s at 16 kHz → 1001 frames)."""
    return max(num_samples, n_fft // 2 + 1) // hop_samples + 1


def _hz_to_mel_htk(freq_hz: float) -> float:
    return 2595.0 * math.log10(1.0 + freq_hz / 700.0)


def mel_filterbank(n_freqs: int, f_min: float, f_max: float, n_mels: int, sample_rate: int) -> torch.Tensor:
    """Triangular HTK-scale filters without area normalisation: (n_freqs, n_mels) float32.

    Computed in float32 in the same order as torchaudio's `melscale_fbanks`, so the filters match to the last bit.
    """
    all_freqs = torch.linspace(0, sample_rate // 2, n_freqs)
    mel_points = torch.linspace(_hz_to_mel_htk(f_min), _hz_to_mel_htk(f_max), n_mels + 2)
    hz_points = 700.0 * (10.0 ** (mel_points / 2595.0) - 1.0)
    hz_gaps = hz_points[1:] - hz_points[:-1]
    slopes = hz_points.unsqueeze(0) - all_freqs.unsqueeze(1)
    rising = -slopes[:, :-2] / hz_gaps[:-1]
    falling = slopes[:, 2:] / hz_gaps[1:]
    return torch.clamp(torch.minimum(rising, falling), min=0.0)


class LogMelFrontEnd(nn.Module):
    """Waveform → log-mel power spectrogram in dB.

    Args:
        n_fft: FFT size and (periodic Hann) window length in samples.
        hop_samples: frame hop in samples (160 = 10 ms at 16 kHz).
        n_mels: mel bins.
        f_min, f_max: mel filter range in Hz.
        top_db: dynamic range kept below each clip's own maximum, in dB.

    Forward: `(batch, samples)` float32 at 16 kHz → `(batch, n_mels, samples // hop + 1)` float32 dB.
    Always runs in float32, also under autocast.
    """

    def __init__(
        self,
        n_fft: int = N_FFT,
        hop_samples: int = HOP_SAMPLES,
        n_mels: int = N_MELS,
        f_min: float = 0.0,
        f_max: float = 8000.0,
        top_db: float = 120.0,
        sample_rate: int = SAMPLE_RATE,
    ) -> None:
        super().__init__()
        self.n_fft = n_fft
        self.hop_samples = hop_samples
        self.top_db = top_db
        # Non-persistent: derived from the arguments, so they never enter (or clash with) a state dict.
        self.register_buffer("window", torch.hann_window(n_fft, periodic=True), persistent=False)
        self.register_buffer(
            "mel_fb", mel_filterbank(n_fft // 2 + 1, f_min, f_max, n_mels, sample_rate), persistent=False
        )

    def stft_as_convolution(self) -> LogMelFrontEnd:
        """Compute the STFT as a strided convolution with the windowed DFT basis instead of `torch.stft` (for ONNX
        export: ONNX Runtime's STFT kernel takes 5x the time of the whole front end in torch). Equal up to float32
        rounding (the ONNX tests bound it). Returns self."""
        n = torch.arange(self.n_fft, dtype=torch.float64)
        k = torch.arange(self.n_fft // 2 + 1, dtype=torch.float64).unsqueeze(1)
        angle = 2 * math.pi * ((k * n) % self.n_fft) / self.n_fft
        window = self.window.double()
        basis = torch.cat([torch.cos(angle) * window, -torch.sin(angle) * window])  # (2 * bins, n_fft)
        self.register_buffer("dft_basis", basis.float().unsqueeze(1), persistent=False)
        return self

    def mel_power(self, waveform: torch.Tensor) -> torch.Tensor:
        """`(batch, samples)` → `(batch, n_mels, frames)` mel power spectrogram (before dB)."""
        # Reflect padding needs more than n_fft // 2 samples: shorter inputs (< 16 ms) are zero-padded to that.
        waveform = nn.functional.pad(waveform.float(), (0, torch.sym_max(self.n_fft // 2 + 1 - waveform.shape[-1], 0)))
        if getattr(self, "dft_basis", None) is not None:
            padded = nn.functional.pad(waveform.unsqueeze(1), (self.n_fft // 2, self.n_fft // 2), mode="reflect")
            real, imag = nn.functional.conv1d(padded, self.dft_basis, stride=self.hop_samples).chunk(2, dim=1)
            return torch.matmul((real * real + imag * imag).transpose(-1, -2), self.mel_fb).transpose(-1, -2)
        spec = torch.stft(
            waveform,
            n_fft=self.n_fft,
            hop_length=self.hop_samples,
            win_length=self.n_fft,
            window=self.window,
            center=True,
            pad_mode="reflect",
            normalized=False,
            onesided=True,
            return_complex=True,
        )
        power = spec.abs().pow(2.0)
        return torch.matmul(power.transpose(-1, -2), self.mel_fb).transpose(-1, -2)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=waveform.device.type, enabled=False):
            mel_db = 10.0 * torch.log10(torch.clamp(self.mel_power(waveform), min=1e-10))
            floor = mel_db.amax(dim=(-2, -1), keepdim=True) - self.top_db
            return torch.maximum(mel_db, floor)
