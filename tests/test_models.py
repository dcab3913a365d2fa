"""The model registry (CED transformers and timm CNNs on the same front end): shapes, per-clip independence, chunking
and checkpoint loading, self-described checkpoints of any registered model included."""

from __future__ import annotations

import pytest
import torch

from ced_train.models import (
    CheckpointError,
    create_model,
    describe_model,
    list_models,
    load_checkpoint,
    variant_dims,
)
from ced_train.models.checkpoint import resize_pos_embed
from ced_train.models.frontend import LogMelFrontEnd, num_frames

PUBLISHED_PARAMS = {"ced_tiny": 5.5e6, "ced_mini": 9.6e6, "ced_small": 22e6, "ced_base": 86e6}


@pytest.fixture(scope="module")
def test_model():
    torch.manual_seed(0)
    return create_model("ced_test").eval()


def waveform(seconds: float, batch: int = 1, seed: int = 0, gain: float = 0.1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, round(seconds * 16000), generator=generator) * gain


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_published_variants_have_the_paper_parameter_counts(name):
    count = sum(p.numel() for p in create_model(name).parameters())
    # The paper rounds (9.70M is reported as 9.6M); 2% covers rounding, not a wrong width or depth.
    assert abs(count - PUBLISHED_PARAMS[name]) / PUBLISHED_PARAMS[name] < 0.02
    assert variant_dims(name)["depth"] == 12


# The open-ended CNN entry needs its timm trunk named.
BUILD_KWARGS = {"cnn": {"arch": "resnet10t"}}


@pytest.mark.parametrize("name", list_models())
def test_every_registered_variant_maps_waveforms_to_class_probabilities(name):
    model = create_model(name, num_classes=10, **BUILD_KWARGS.get(name, {})).eval()
    with torch.no_grad():
        probs = model(waveform(1.0, batch=2))
    assert probs.shape == (2, 10)
    assert torch.all((probs > 0) & (probs < 1))


def test_unknown_model_name_lists_the_known_ones():
    with pytest.raises(KeyError, match="ced_tiny"):
        create_model("ced_huge")


def test_logit_pooling_returns_the_logits_of_mean_pooling(test_model):
    logit_model = create_model("ced_test", pooling="logit").eval()
    logit_model.load_state_dict(test_model.state_dict())
    x = waveform(2.0)
    with torch.no_grad():
        torch.testing.assert_close(logit_model(x).sigmoid(), test_model(x), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="pooling"):
        create_model("ced_test", pooling="max")


def test_a_clip_output_does_not_depend_on_its_batch_mates(test_model):
    quiet = waveform(3.0, seed=1, gain=1e-4)
    loud = waveform(3.0, seed=2, gain=10.0)
    with torch.no_grad():
        alone = test_model(quiet)
        batched = test_model(torch.cat([quiet, loud]))
    torch.testing.assert_close(batched[:1], alone, rtol=0, atol=1e-6)


@pytest.mark.parametrize("num_samples", [100, 300, 1000, 2400])
def test_inputs_shorter_than_one_patch_are_padded_not_rejected(test_model, num_samples):
    with torch.no_grad():
        probs = test_model(waveform(num_samples / 16000))
    assert probs.shape == (1, 527) and torch.isfinite(probs).all()


@pytest.mark.parametrize("num_samples", [1, 100, 256, 257, 300, 16000, 160000, 160159, 160160])
def test_num_frames_is_the_front_end_output_length(num_samples):
    assert LogMelFrontEnd()(torch.zeros(1, num_samples)).shape[-1] == num_frames(num_samples)


def test_input_of_exactly_two_tables_keeps_both_chunks(test_model):
    frames = 2 * test_model.target_length
    mel = test_model.front_end(waveform((frames - 1) * 160 / 16000))
    assert mel.shape[-1] == frames
    with torch.no_grad():
        whole = test_model.forward_spectrogram(mel)
        spec = test_model.normalise(mel)
        halves = [test_model.forward_head(test_model.forward_features(c)) for c in spec.split(frames // 2, -1)]
    torch.testing.assert_close(whole, (halves[0] + halves[1]) / 2, rtol=0, atol=1e-6)


def test_long_input_is_the_mean_of_its_zero_padded_chunks(test_model):
    mel = test_model.front_end(waveform(23.7))
    table = test_model.target_length
    with torch.no_grad():
        spec = test_model.normalise(mel)
        spec = torch.nn.functional.pad(spec, (0, 3 * table - spec.shape[-1]))
        chunk_probs = [test_model.forward_head(test_model.forward_features(c)) for c in spec.split(table, -1)]
        torch.testing.assert_close(
            test_model.forward_spectrogram(mel), torch.stack(chunk_probs).mean(0), rtol=0, atol=1e-6
        )


# --- checkpoints ---------------------------------------------------------------------------------------------------


def assert_same_outputs(a, b, seconds=2.0):
    x = waveform(seconds)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_official_checkpoint_format_loads_and_infers_the_variant(tmp_path, test_model):
    path = tmp_path / "audiotransformer_test.pt"
    torch.save({"model": test_model.state_dict()}, path)
    loaded = load_checkpoint(path)
    assert not loaded.training and loaded.embed_dim == 64
    assert_same_outputs(loaded, test_model)


def test_bare_state_dict_with_torchaudio_front_end_buffers_loads(tmp_path, test_model):
    state = dict(test_model.state_dict())
    state["front_end.0.spectrogram.window"] = torch.hann_window(512)
    state["front_end.0.mel_scale.fb"] = test_model.front_end.mel_fb.clone()
    path = tmp_path / "bare.pt"
    torch.save(state, path)
    assert_same_outputs(load_checkpoint(path), test_model)


def test_lightning_checkpoint_of_this_project_loads(tmp_path, test_model):
    path = tmp_path / "last.ckpt"
    state = {f"model.{k}": v for k, v in test_model.state_dict().items()}
    state["teacher.extra"] = torch.zeros(1)
    torch.save({"state_dict": state, "ced_model": {"name": "ced_test", "num_classes": 527, "pooling": "logit"}}, path)
    loaded = load_checkpoint(path, pooling="mean")
    assert_same_outputs(loaded, test_model)


def test_new_head_size_is_taken_from_the_checkpoint(tmp_path):
    model = create_model("ced_test", num_classes=7).eval()
    path = tmp_path / "seven.pt"
    torch.save(model.state_dict(), path)
    assert load_checkpoint(path).num_classes == 7


def test_missing_and_unexpected_tensors_are_listed(tmp_path, test_model):
    state = dict(test_model.state_dict())
    del state["blocks.1.mlp.fc2.bias"]
    state["head.weight"] = torch.zeros(3)
    path = tmp_path / "broken.pt"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert "blocks.1.mlp.fc2.bias" in message and "head.weight" in message and str(path) in message


def test_shape_mismatch_names_the_tensor(tmp_path, test_model):
    state = dict(test_model.state_dict())
    state["blocks.0.attn.qkv.weight"] = torch.zeros(5, 64)
    path = tmp_path / "bad_shape.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"blocks\.0\.attn\.qkv\.weight.*\(5, 64\)"):
        load_checkpoint(path)


def test_unknown_width_and_unreadable_files_are_clear_errors(tmp_path):
    odd = create_model("ced_test", embed_dim=96, num_heads=2)
    torch.save(odd.state_dict(), tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match="embed_dim=96"):
        load_checkpoint(tmp_path / "odd.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "absent.pt")


def test_positional_tables_of_another_length_are_resized(tmp_path, test_model):
    state = dict(test_model.state_dict())
    state["time_pos_embed"] = torch.randn(1, 64, 1, 100)
    path = tmp_path / "long_table.pt"
    torch.save(state, path)
    loaded = load_checkpoint(path)
    torch.testing.assert_close(loaded.time_pos_embed, state["time_pos_embed"][..., :63])
    shorter = resize_pos_embed(torch.randn(1, 8, 1, 30), 63, -1)
    assert shorter.shape == (1, 8, 1, 63)


def export_file(path, model, name) -> None:
    """The layout of this project's exports (`lightning.fit.export_model`): description + inference weights."""
    torch.save({"ced_model": {**describe_model(model, name), "state_dict": model.state_dict()}}, path)


@pytest.mark.parametrize("name, kwargs", [("mobilenetv3_small", {}), ("cnn", {"arch": "resnet10t"})])
def test_a_cnn_checkpoint_describes_its_trunk_and_loads_with_the_same_outputs(tmp_path, name, kwargs):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, pooling="logit", **kwargs).eval()
    with torch.no_grad():  # BatchNorm statistics away from their initial values, as after training
        model.init_bn[1].running_mean.uniform_(-60, -20)
    export_file(tmp_path / "cnn.ckpt", model, name)
    loaded = load_checkpoint(tmp_path / "cnn.ckpt")
    assert type(loaded) is type(model) and loaded.arch == model.arch and loaded.num_classes == 7
    x = waveform(2.0, batch=2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_a_cnn_clip_output_does_not_depend_on_its_batch_mates_or_length_limits():
    model = create_model("mobilenetv3_small", num_classes=5).eval()
    quiet, loud = waveform(3.0, seed=1, gain=1e-4), waveform(3.0, seed=2, gain=10.0)
    with torch.no_grad():
        alone = model(quiet)
        together = model(torch.cat([quiet, loud]))[:1]
        short = model(waveform(0.05))  # 6 frames: padded to the trunk's stride, not rejected
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)
    assert short.shape == (1, 5)


def test_a_checkpoint_describing_an_unknown_trunk_is_one_clear_error(tmp_path):
    model = create_model("mobilenetv3_small", num_classes=3)
    torch.save({"ced_model": {**describe_model(model, "cnn"), "arch": "no_such_net",
                              "state_dict": model.state_dict()}}, tmp_path / "odd.ckpt")
    with pytest.raises(CheckpointError, match=r"odd.ckpt: cannot build the model it describes.*no_such_net"):
        load_checkpoint(tmp_path / "odd.ckpt")
