"""Parity with the official CED implementation (torchaudio front end, official model) from a stored fixture.

The fixture `tests/fixtures/parity_reference.npz` was made by `tests/fixtures/make_parity_reference.py` with torch 2.11
and torchaudio 2.11 (see tests/fixtures/README.md); weights and waveforms are regenerated from seeds by
`tests/fixtures/reference_weights.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ced_train.models import LogMelFrontEnd, create_model, load_weights
from ced_train.models.checkpoint import resize_pos_embed
from ced_train.models.frontend import mel_filterbank
from tests.fixtures.reference_weights import EXACT_MULTIPLE_CLIP, PARITY_CLIPS, make_waveform, make_weights

FIXTURE = np.load(Path(__file__).parent / "fixtures" / "parity_reference.npz")
SIZES = ["tiny", "mini", "small", "base"]


def official_state_dict(size: str) -> dict[str, torch.Tensor]:
    """Random weights under the official names, front-end buffers included, as an official file would hold them."""
    shapes = {key: tuple(shape) for key, shape in json.loads(str(FIXTURE[f"{size}/state_dict_shapes"])).items()}
    state = {key: torch.from_numpy(value) for key, value in make_weights(shapes, int(FIXTURE[f"{size}/seed"])).items()}
    state["init_bn.1.num_batches_tracked"] = torch.tensor(0)
    state["front_end.0.spectrogram.window"] = torch.from_numpy(FIXTURE["frontend/window"])
    state["front_end.0.mel_scale.fb"] = torch.from_numpy(FIXTURE["frontend/fb"])
    return state


def test_regenerated_waveforms_are_the_fixture_inputs():
    for i, name in enumerate(json.loads(str(FIXTURE["model/clip_names"]))):
        wave = make_waveform(*PARITY_CLIPS[name]).astype(np.float64)
        assert wave.sum() == pytest.approx(FIXTURE["model/clip_sum"][i], rel=1e-12)
        assert (wave**2).sum() == pytest.approx(FIXTURE["model/clip_sum_squares"][i], rel=1e-12)


@pytest.mark.parametrize("size", SIZES)
def test_outputs_equal_the_official_implementation_at_all_lengths(size):
    model = create_model(f"ced_{size}").eval()
    state = official_state_dict(size)
    assert set(state) - {"front_end.0.spectrogram.window", "front_end.0.mel_scale.fb"} == set(model.state_dict())
    load_weights(model, state, f"fixture {size}")
    expected = FIXTURE[f"{size}/probs"]
    with torch.no_grad():
        for i, name in enumerate(json.loads(str(FIXTURE["model/clip_names"]))):
            waveform = torch.from_numpy(make_waveform(*PARITY_CLIPS[name])).unsqueeze(0)
            probs = model(waveform).numpy()[0]
            np.testing.assert_allclose(probs, expected[i], rtol=0, atol=1e-5, err_msg=f"ced_{size}, {name} clip")


def test_exact_multiple_of_the_table_averages_both_chunks_unlike_the_official_code():
    model = create_model("ced_tiny").eval()
    load_weights(model, official_state_dict("tiny"))
    waveform = torch.from_numpy(make_waveform(*EXACT_MULTIPLE_CLIP)).unsqueeze(0)
    with torch.no_grad():
        probs = model(waveform).numpy()
    np.testing.assert_allclose(probs, FIXTURE["tiny/probs_exact_multiple_all_chunks"], rtol=0, atol=1e-5)
    assert np.abs(probs - FIXTURE["tiny/probs_exact_multiple_official"]).max() > 1e-3


def test_mel_filterbank_and_window_equal_torchaudio():
    np.testing.assert_array_equal(mel_filterbank(257, 0.0, 8000.0, 64, 16000).numpy(), FIXTURE["frontend/fb"])
    np.testing.assert_array_equal(LogMelFrontEnd().window.numpy(), FIXTURE["frontend/window"])


@pytest.mark.parametrize("case", ["noise_sines", "chirp", "wide_range"])
def test_front_end_equals_torchaudio_melspectrogram_and_amplitude_to_db(case):
    front_end = LogMelFrontEnd()
    wave = torch.from_numpy(FIXTURE[f"frontend/{case}/wave"]).unsqueeze(0)
    power = front_end.mel_power(wave)[0].numpy()
    expected_power = FIXTURE[f"frontend/{case}/power_mel"]
    assert power.shape == expected_power.shape
    np.testing.assert_allclose(power / expected_power.max(), expected_power / expected_power.max(), rtol=0, atol=1e-6)
    assert_db_close(front_end(wave)[0].numpy(), FIXTURE[f"frontend/{case}/db"])


@pytest.mark.parametrize("case", ["noise_sines", "chirp", "wide_range"])
def test_the_convolution_stft_of_the_onnx_graph_equals_torchaudio_up_to_float32_rounding(case):
    front_end = LogMelFrontEnd().stft_as_convolution()
    wave = torch.from_numpy(FIXTURE[f"frontend/{case}/wave"]).unsqueeze(0)
    power = front_end.mel_power(wave)[0].numpy()
    expected = FIXTURE[f"frontend/{case}/power_mel"]
    np.testing.assert_allclose(power / expected.max(), expected / expected.max(), rtol=0, atol=1e-6)
    below = FIXTURE[f"frontend/{case}/db"].max() - FIXTURE[f"frontend/{case}/db"]
    near = below < 40  # float32 DFT sums err by ~1e-7 of the peak power: 0.01 dB at 40 dB down
    np.testing.assert_allclose(front_end(wave)[0].numpy()[near], FIXTURE[f"frontend/{case}/db"][near], rtol=0,
                               atol=0.01)


def assert_db_close(db: np.ndarray, expected_db: np.ndarray) -> None:
    """dB values against the fixture's, within float32 rounding of the power at each level below the peak.

    A power error of δ moves a bin of power P by 4.34·δ/P dB. float32 STFTs err by δ ≈ 2e-10 of the peak power, and
    releases round differently (the fixture is torch 2.11's; torch 2.14 differs from it by up to 7.5e-10·10^(d/10)
    dB at d dB below the peak, 1e-5 dB near it), so the bound is 1e-5 + 3e-9·10^(d/10) dB: 1.3e-5 dB within 30 dB
    of the peak, 3e-3 dB at 60 dB; everywhere, also below 80 dB where the floor decides, 0.2 dB.
    """
    below = expected_db.max() - expected_db
    atol = 1e-5 + 3e-9 * 10.0 ** (below / 10.0)
    near = below < 80
    worst = np.argmax(np.abs(db - expected_db)[near] - atol[near])
    assert np.all(np.abs(db - expected_db)[near] <= atol[near]), (
        f"{db[near][worst]} != {expected_db[near][worst]} at {below[near][worst]:.1f} dB below the peak")
    np.testing.assert_allclose(db, expected_db, rtol=0, atol=0.2)


def test_front_end_floor_is_per_clip_where_torchaudio_takes_it_over_the_batch():
    wave = torch.from_numpy(FIXTURE["frontend/louder_batch/wave"])
    db = LogMelFrontEnd()(wave).numpy()
    per_clip = FIXTURE["frontend/louder_batch/db_per_clip_floor"]
    batch_floor = FIXTURE["frontend/louder_batch/db_batch_floor"]
    for clip in range(2):  # every value, the floor included, within the rounding bound of `assert_db_close`
        assert_db_close(db[clip], per_clip[clip])
    assert not np.allclose(db[0], batch_floor[0], atol=1.0)


def test_positional_tables_are_resized_as_the_official_code_does():
    time_in = torch.from_numpy(FIXTURE["posembed/time_in"])
    np.testing.assert_array_equal(resize_pos_embed(time_in, 32, -1).numpy(), FIXTURE["posembed/time_to32"])
    np.testing.assert_allclose(resize_pos_embed(time_in, 80, -1).numpy(), FIXTURE["posembed/time_to80"], atol=1e-6)
    freq_in = torch.from_numpy(FIXTURE["posembed/freq_in"])
    np.testing.assert_array_equal(resize_pos_embed(freq_in, 4, -2).numpy(), FIXTURE["posembed/freq_to4"])
