"""Augmentation as data: counter-based sampling, bounds, mixup partners and the one `apply`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ced_train.augment import (
    VIEW_PARAMS_DTYPE,
    AugmentConfig,
    apply,
    block_bounds,
    check_params,
    fixed_length,
    mix_labels,
    params_from_columns,
    params_to_columns,
    sample_view,
    sample_views,
)

CONFIG = AugmentConfig()
KEYS = [f"clip{i:03d}" for i in range(40)]


def sample_shard(config=CONFIG, seed=0, views=(0, 1, 2), keys=KEYS) -> np.ndarray:
    """(views, clips) parameters of one shard holding `keys` in that order."""
    return np.stack(
        [sample_views(config, seed, keys, [v] * len(keys), list(range(len(keys))), len(keys)) for v in views]
    )


def test_view_params_record_is_13_packed_bytes():
    assert VIEW_PARAMS_DTYPE.itemsize == 13


def test_sampling_depends_only_on_seed_key_view_row_not_on_call_order():
    forward = [sample_view(CONFIG, 7, key, 3, row, 40) for row, key in enumerate(KEYS)]
    backward = [sample_view(CONFIG, 7, key, 3, row, 40) for row, key in reversed(list(enumerate(KEYS)))][::-1]
    batched = sample_views(CONFIG, 7, KEYS, [3] * 40, list(range(40)), 40)
    assert np.array_equal(np.array(forward), np.array(backward))
    assert np.array_equal(np.array(forward), batched)


def test_seed_key_and_view_each_change_the_parameters():
    base = sample_view(CONFIG, 0, "clip000", 0, 0, 40)
    others = [sample_view(CONFIG, 1, "clip000", 0, 0, 40), sample_view(CONFIG, 0, "clip001", 0, 0, 40),
              sample_view(CONFIG, 0, "clip000", 1, 0, 40)]
    for other in others:
        assert other.tobytes() != base.tobytes()


def test_sampled_parameters_stay_within_the_configured_bounds():
    params = sample_shard(views=range(50)).reshape(-1)
    check_params(params, CONFIG.frames, len(KEYS))
    assert np.abs(params["shift_frames"]).max() <= 500
    assert params["time_mask_frames"].max() <= 192 and params["freq_mask_bins"].max() <= 24
    assert np.all(params["time_mask_start"] + params["time_mask_frames"] <= 1001)
    assert np.all(params["freq_mask_start"].astype(int) + params["freq_mask_bins"] <= 64)
    # Shift with probability 0.5, mixup with probability 0.5 (2000 draws: well within 0.4..0.6).
    assert 0.4 < np.mean(params["shift_frames"] != 0) < 0.6
    assert 0.4 < np.mean(params["partner_row"] >= 0) < 0.6


def test_mixup_partner_is_another_clip_of_the_same_block():
    config = AugmentConfig(mixup_prob=1.0, mixup_block_clips=16)
    params = sample_shard(config, views=range(20))
    rows = np.broadcast_to(np.arange(len(KEYS)), params.shape)
    partner = params["partner_row"]
    # 40 clips in blocks of 16 (the last holds 8). A weight that rounds to 0/255 means no mixup (a few %).
    mixed = partner >= 0
    assert mixed.mean() > 0.9
    assert np.all(partner[mixed] != rows[mixed])
    assert np.all(partner[mixed] // 16 == rows[mixed] // 16)
    assert np.all(params["partner_weight_q"][mixed] > 0) and np.all(params["partner_weight_q"][~mixed] == 0)
    assert block_bounds(39, 40, 16) == (32, 40)


def test_a_clip_alone_in_its_block_gets_no_partner():
    config = AugmentConfig(mixup_prob=1.0, mixup_block_clips=4)
    record = sample_view(config, 0, "last", 0, row=4, shard_clips=5)
    assert record["partner_row"] == -1 and record["partner_weight_q"] == 0


def test_switching_mixup_off_leaves_the_other_parameters_unchanged():
    with_mixup = sample_shard(AugmentConfig(mixup_prob=1.0))
    without = sample_shard(AugmentConfig(mixup_prob=0.0))
    assert np.all(without["partner_row"] == -1) and np.all(without["partner_weight_q"] == 0)
    for name in ("shift_frames", "time_mask_start", "time_mask_frames", "freq_mask_start", "freq_mask_bins"):
        assert np.array_equal(with_mixup[name], without[name])


def test_zero_widths_disable_masks_and_shift():
    params = sample_shard(AugmentConfig(shift_prob=0.0, time_mask_max_frames=0, freq_mask_max_bins=0))
    assert not params["shift_frames"].any() and not params["time_mask_frames"].any()
    assert not params["freq_mask_bins"].any()


def record(**fields) -> np.ndarray:
    params = np.zeros(1, dtype=VIEW_PARAMS_DTYPE)
    params["partner_row"] = -1
    for name, value in fields.items():
        params[name] = value
    return params


def test_apply_shifts_circularly_either_way_then_masks_with_the_fill_value():
    mel = torch.randn(2, 64, 1001)
    params = np.concatenate([
        record(shift_frames=300, time_mask_start=10, time_mask_frames=5, freq_mask_start=60, freq_mask_bins=4),
        record(shift_frames=-7, time_mask_start=996, time_mask_frames=5),
    ])
    out = apply(mel, params_to_columns(params), mel, fill_db=-3.0)
    expected = torch.stack([torch.roll(mel[0], 300, dims=-1), torch.roll(mel[1], -7, dims=-1)])
    expected[0, :, 10:15] = -3.0
    expected[0, 60:64, :] = -3.0
    expected[1, :, 996:] = -3.0
    assert torch.equal(out, expected)
    assert not torch.equal(mel, out)  # the input is left alone


def test_apply_mixes_with_exactly_the_quantised_weight():
    own, partner = torch.randn(1, 64, 1001), torch.randn(1, 64, 1001)
    params = record(partner_row=5, partner_weight_q=51)  # w = 51 / 255 = 0.2
    out = apply(own, params_to_columns(params), partner)
    weight = torch.tensor(51.0) / 255
    assert torch.equal(out, own * ((255 - torch.tensor(51.0)) / 255) + partner * weight)
    assert torch.allclose(out, 0.8 * own + 0.2 * partner, atol=1e-5)


def test_apply_of_a_batch_equals_apply_of_each_row_bit_for_bit():
    config = AugmentConfig(mixup_prob=1.0, mixup_block_clips=8)
    params = sample_shard(config, views=[0])[0][:8]
    assert (params["partner_row"] >= 0).sum() >= 4 and (params["shift_frames"] != 0).any()
    mel, partner = torch.randn(8, 64, 1001) * 30, torch.randn(8, 64, 1001) * 30
    batch = apply(mel, params_to_columns(params), partner)
    for i in range(8):
        row = apply(mel[i : i + 1], params_to_columns(params[i : i + 1]), partner[i : i + 1])[0]
        assert torch.equal(batch[i], row)


def test_apply_ignores_the_partner_of_rows_without_one():
    mel = torch.randn(1, 64, 50)
    out = apply(mel, params_to_columns(record()), torch.full((1, 64, 50), float("nan")))
    assert torch.equal(out, mel)


def test_parameters_outside_the_grid_are_refused_and_apply_needs_a_partner_of_its_shape():
    with pytest.raises(ValueError, match="time mask"):
        check_params(record(time_mask_start=95, time_mask_frames=10), frames=100)
    with pytest.raises(ValueError, match="partner_row beyond"):
        check_params(record(partner_row=40), frames=100, shard_clips=40)
    with pytest.raises(ValueError, match="partner_mel_db"):
        apply(torch.zeros(1, 64, 100), params_to_columns(record()), torch.zeros(1, 64, 99))


def test_fixed_length_pads_short_clips_with_zeros_and_cuts_long_ones():
    assert np.array_equal(fixed_length(np.ones(3, np.float32), 5), [1, 1, 1, 0, 0])
    assert np.array_equal(fixed_length(np.arange(8, dtype=np.float32), 5), np.arange(5))


def test_mix_labels_uses_the_input_weights():
    params = np.concatenate([record(partner_row=1, partner_weight_q=255), record()])
    labels = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    partner_labels = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    assert torch.equal(mix_labels(labels, partner_labels, params), torch.tensor([[0.0, 1.0], [1.0, 0.0]]))


def test_params_survive_the_column_form_used_by_data_loaders():
    params = sample_shard(views=[0])[0]
    assert np.array_equal(params_from_columns(params_to_columns(params)), params)


def test_config_json_round_trips_and_invalid_values_are_named():
    assert AugmentConfig.from_json(CONFIG.to_json()) == CONFIG
    assert AugmentConfig(mixup_alpha=0.2).differences(CONFIG) == ["mixup_alpha: 0.2 != 0.5"]
    with pytest.raises(ValueError, match="freq_mask_max_bins=65"):
        AugmentConfig(freq_mask_max_bins=65)
    with pytest.raises(ValueError, match="mixup_prob=1.5"):
        AugmentConfig(mixup_prob=1.5)
