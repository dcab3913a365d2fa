"""The paper's released teacher outputs (RicherMans/CED `save_logits.py`): reading their layout and re-deriving each
stored view from its seed, checked against outputs of the reference code itself (tests/fixtures/official_logits,
made by its make_official_logits.py at batch size 1)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from ced_train.audio import SAMPLE_RATE
from ced_train.augment import apply, params_to_columns
from ced_train.models.frontend import LogMelFrontEnd, num_frames
from ced_train.store import StoreError
from ced_train.store.official import official_parts, official_view, read_official_part

FIXTURE = Path(__file__).parent / "fixtures" / "official_logits"


def test_seed_draws_equal_the_reference_global_generator_of_torch_2_0_1():
    """(seed, chunk length) → (shift applied, shift, u1, u2), as the reference's call sequence drew them with torch
    2.0.1's global generator (its era); 40 pairs, lengths odd and even, seeds up to 2^31 - 1."""
    draws = json.loads((FIXTURE / "draws_torch2.0.1.json").read_text())
    assert len(draws) == 40
    for name, (applied, shift, u1, u2) in draws.items():
        seed, length = map(int, name.split("_"))
        view = official_view(seed, length, time_frames=1001)
        assert view.shift_samples == shift and (shift != 0 or not applied), name
        time_width = int((torch.tensor([u1]) * 192).long())
        freq_width = int((torch.tensor([u1]) * 24).long())
        assert (view.time_mask_frames, view.freq_mask_bins) == (time_width, freq_width), name
        assert view.time_mask_start == int((torch.tensor([u2]) * (1001 - torch.tensor([u1]) * 192)).long()), name


def fixture_rows() -> dict[tuple[int, int], dict]:
    return {(row["epoch"], row["row"]): row for row in json.loads((FIXTURE / "rows.json").read_text())}


def test_the_released_layout_is_read_view_by_view_with_its_clip_names_and_times():
    parts = [read_official_part(path) for path in official_parts(FIXTURE / "logits")]
    assert [(part.view, part.rank) for part in parts] == [(1, 0), (2, 0)]
    rows = fixture_rows()
    for part in parts:
        assert len(part) == 6 and part.topk_values.shape == part.topk_indices.shape == (6, 20)
        assert (np.diff(part.topk_values.astype(np.float32), axis=1) <= 0).all()
        for i, (name, start, end, seed) in enumerate(zip(part.filenames, part.starts_s, part.ends_s, part.seeds)):
            row = rows[(part.view, i)]
            assert (name, float(start), float(end), int(seed)) == (row["filename"], row["start"], row["end"],
                                                                  row["seed"])


def test_re_derived_views_reproduce_the_inputs_the_reference_teacher_saw():
    """Every row of both views: its chunk rolled by the re-derived sample shift, through this project's front end,
    masked by `augment.apply` with the re-derived masks, equals the masked log-mel the reference fed its teacher
    (stored as float16, hence the tolerance; at batch size 1 the reference's per-batch dB floor is the clip's own)."""
    expected = np.load(FIXTURE / "expected.npz")
    rows = fixture_rows()
    front_end = LogMelFrontEnd()
    shifted = 0
    for path in official_parts(FIXTURE / "logits"):
        part = read_official_part(path)
        for i, (name, start, end, seed) in enumerate(zip(part.filenames, part.starts_s, part.ends_s, part.seeds)):
            audio, rate = soundfile.read(FIXTURE / "audio" / Path(name).with_suffix(".flac").name, dtype="float32")
            assert rate == SAMPLE_RATE
            chunk = audio[round(float(start) * SAMPLE_RATE) : round(float(end) * SAMPLE_RATE)]
            view = official_view(int(seed), len(chunk), time_frames=num_frames(len(chunk)))
            row = rows[(part.view, i)]
            assert (view.shift_samples, [view.time_mask_start, view.time_mask_start + view.time_mask_frames],
                    [view.freq_mask_start, view.freq_mask_start + view.freq_mask_bins]) == (
                row["shift_samples"], row["time_mask"], row["freq_mask"])
            shifted += view.shift_samples != 0
            mel_db = front_end(torch.from_numpy(np.roll(chunk, view.shift_samples))[None])
            rendered = apply(mel_db, params_to_columns(view.params()[None]), mel_db)[0]
            reference = torch.from_numpy(expected[f"ep{part.view}_row{i}"].astype(np.float32))
            assert rendered.shape == reference.shape
            masked = reference == 0
            assert torch.equal(rendered == 0, masked), (part.view, i)
            # float16 rounds by up to 1/32 dB in [64, 128) dB of magnitude (measured here: at most 0.016)
            torch.testing.assert_close(rendered, reference, atol=0.035, rtol=0)
    assert shifted >= 3  # the fixture exercises the shift, not only the masks


def test_a_part_without_its_parquet_or_with_rows_that_disagree_is_one_error_naming_it(tmp_path):
    logits = tmp_path / "logits"
    shutil.copytree(FIXTURE / "logits", logits)
    (logits / "logits_ep2_0.parquet").unlink()
    with pytest.raises(StoreError, match=r"logits_ep2_0.h5: no logits_ep2_0.parquet beside it"):
        read_official_part(logits / "logits_ep2_0.h5")
    import h5py

    with h5py.File(logits / "logits_ep1_0.h5", "r+") as file:
        seeds = file["seeds"][...]
        del file["seeds"]
        file["seeds"] = seeds[:-1]
    with pytest.raises(StoreError, match=r"logits_ep1_0.h5: .* do not describe the same rows"):
        read_official_part(logits / "logits_ep1_0.h5")
    with pytest.raises(StoreError, match="holds no logits_ep"):
        official_parts(tmp_path)
