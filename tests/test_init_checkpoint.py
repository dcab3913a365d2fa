"""Initialisation from a checkpoint (`train/distill.init_checkpoint`): MAE and official files, a new head for other
classes, skipped extras, resized positional tables, and one-line errors for the wrong model."""

from __future__ import annotations

import logging

import pytest
import torch

from ced_train.models import CheckpointError, create_model, init_from_checkpoint
from ced_train.models.checkpoint import resize_pos_embed


def _mae_like(model_name: str = "ced_test", time_steps: int | None = None) -> dict[str, torch.Tensor]:
    """The tensors of an MAE checkpoint: the encoder under official names, a decoder and mask token, no head."""
    torch.manual_seed(1)
    encoder = create_model(model_name, num_classes=527).state_dict()
    state = {key: torch.randn_like(value) if value.is_floating_point() else value
             for key, value in encoder.items() if not key.startswith("outputlayer.")}
    if time_steps is not None:
        state["time_pos_embed"] = torch.randn(*state["time_pos_embed"].shape[:-1], time_steps)
    state["mask_token"] = torch.randn(1, 1, state["patch_embed.proj.weight"].shape[0])
    state["decoder_blocks.0.attn.qkv.weight"] = torch.randn(24, 8)
    state["front_end.0.mel_scale.fb"] = torch.randn(257, 64)
    return state


def test_mae_checkpoint_loads_the_backbone_keeps_a_new_head_and_lists_what_it_skipped(tmp_path, caplog):
    state = _mae_like()
    path = tmp_path / "audiotransformer_test_mae_as_10s.pt"
    torch.save({"model": state}, path)
    model = create_model("ced_test", num_classes=10, pooling="logit")
    head_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("outputlayer.")}
    with caplog.at_level(logging.INFO):
        summary = init_from_checkpoint(model, path)
    own = model.state_dict()
    for key in summary.loaded:
        torch.testing.assert_close(own[key], state[key], rtol=0, atol=0)
    assert set(summary.loaded) == {k for k in own if not k.startswith("outputlayer.")}
    assert set(summary.new) == set(head_before) and not summary.head_loaded
    for key, value in head_before.items():
        torch.testing.assert_close(own[key], value, rtol=0, atol=0)
    assert set(summary.skipped) == {"mask_token", "decoder_blocks.0.attn.qkv.weight", "front_end.0.mel_scale.fb"}
    line = [record.message for record in caplog.records if "init from" in record.message]
    assert len(line) == 1 and f"loaded {len(summary.loaded)} tensors" in line[0] and "mask_token" in line[0]


def test_a_head_of_the_same_shape_is_loaded_and_one_of_other_classes_is_skipped(tmp_path):
    torch.manual_seed(2)
    released = create_model("ced_test", num_classes=527)
    path = tmp_path / "released.pt"
    torch.save(released.state_dict(), path)  # a bare state dict
    same = create_model("ced_test", num_classes=527, pooling="logit")
    assert init_from_checkpoint(same, path).head_loaded
    torch.testing.assert_close(same.outputlayer[1].weight, released.outputlayer[1].weight, rtol=0, atol=0)

    other = create_model("ced_test", num_classes=5, pooling="logit")
    summary = init_from_checkpoint(other, path)
    assert not summary.head_loaded
    assert "outputlayer.1.weight" in summary.new and "outputlayer.1.weight" in summary.skipped
    # The whole head is new, its LayerNorm too: half a head from another task is not a head.
    assert "outputlayer.0.weight" in summary.new


def test_a_positional_table_of_another_length_is_resized_as_the_official_code_does(tmp_path):
    model = create_model("ced_test", num_classes=10)
    own_steps = model.time_pos_embed.shape[-1]
    state = _mae_like(time_steps=own_steps // 2)
    path = tmp_path / "mae.pt"
    torch.save(state, path)
    init_from_checkpoint(model, path)
    torch.testing.assert_close(model.time_pos_embed.data, resize_pos_embed(state["time_pos_embed"], own_steps, -1))


def test_a_checkpoint_of_another_size_is_refused_naming_the_tensor(tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save({"model": _mae_like("ced_tiny")}, path)
    with pytest.raises(CheckpointError, match=r"tiny\.pt: backbone tensor '.+' has shape"):
        init_from_checkpoint(create_model("ced_test", num_classes=10), path)


def test_a_file_with_no_matching_backbone_tensor_is_refused(tmp_path):
    path = tmp_path / "resnet.pt"
    torch.save({"conv1.weight": torch.randn(8, 1, 3, 3), "fc.weight": torch.randn(10, 8)}, path)
    with pytest.raises(CheckpointError, match="no tensor matches the model's backbone"):
        init_from_checkpoint(create_model("ced_test", num_classes=10), path)


def test_the_finetune_recipe_trains_a_released_model_on_other_classes_with_a_new_head(synthetic_train_shards,
                                                                                       tmp_path):
    """A "released" model of 10 classes fine-tuned on 527-class shards: its backbone is loaded, its head replaced,
    and the run trains and scores the fine-tuned model."""
    from ced_train.__main__ import compose, run_stages

    torch.manual_seed(0)
    released = create_model("ced_test", num_classes=10)
    torch.save({"model": released.state_dict()}, tmp_path / "released.pt")
    cfg = compose(["~local", "+recipe=finetune", f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/run",
                   f"train.init_checkpoint={tmp_path}/released.pt", f"data.train_shards={synthetic_train_shards}",
                   f"data.val_shards={synthetic_train_shards}", f"data.eval_shards={synthetic_train_shards}",
                   "model@train.model=ced_test", "data.batch_size=4",
                   "train.trainer.max_epochs=1", "train.optim.scheduler.warmup_steps=2", "trainer=cpu",
                   "trainer.enable_progress_bar=false", "~callbacks.progress_bar", "logger=csv"])
    results, _ = run_stages(cfg)
    [member] = results["train"]["members"]
    assert member["init"].startswith(f"init from {tmp_path}/released.pt: loaded ")
    # The whole head (its norm and its linear layer) starts anew; the file's head tensors are listed as skipped.
    assert "; new 4 [outputlayer." in member["init"] and "skipped 4 [outputlayer." in member["init"]
    exported = torch.load(tmp_path / "run" / "train" / "member0.ckpt", weights_only=True)["ced_model"]["state_dict"]
    assert exported["outputlayer.1.weight"].shape[0] == 527
    assert results["evaluate"]["systems"]["finetuned"]["num_clips"] == 21
