"""The Hugging Face layout (`mispeech/ced-*`: config.json + model.safetensors) read everywhere a checkpoint is accepted
and written by `python -m ced_train.export --format hf`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file, save_file

from ced_train import export, tag
from ced_train.labels import load_class_labels
from ced_train.models import create_model, init_from_checkpoint, load_checkpoint
from ced_train.models.hf import write_hf
from ced_train.teachers import describe_checkpoint, load_ensemble
from tests.fixtures.reference_weights import PARITY_CLIPS, make_waveform
from tests.test_parity import FIXTURE, official_state_dict

# Every tensor name of a 2-block CED in the released HF checkpoints, spelled out (not derived from our mapping).
HF_BLOCK_PARAMS = ["attn.proj.bias", "attn.proj.weight", "attn.qkv.bias", "attn.qkv.weight", "mlp.fc1.bias",
                   "mlp.fc1.weight", "mlp.fc2.bias", "mlp.fc2.weight", "norm1.bias", "norm1.weight", "norm2.bias",
                   "norm2.weight"]
HF_NAMES_CED_TEST = sorted(
    [f"encoder.blocks.{i}.{p}" for i in range(2) for p in HF_BLOCK_PARAMS]
    + ["encoder.freq_pos_embed", "encoder.time_pos_embed", "encoder.init_bn.bias", "encoder.init_bn.weight",
       "encoder.init_bn.running_mean", "encoder.init_bn.running_var", "encoder.init_bn.num_batches_tracked",
       "encoder.norm.bias", "encoder.norm.weight", "encoder.patch_embed.proj.bias", "encoder.patch_embed.proj.weight",
       "outputlayer.0.bias", "outputlayer.0.weight", "outputlayer.1.bias", "outputlayer.1.weight"])


@pytest.fixture(scope="module")
def official_tiny(tmp_path_factory):
    """The parity fixture's CED-Tiny weights as an official Zenodo file (front-end buffers included)."""
    path = tmp_path_factory.mktemp("official") / "audiotransformer_tiny_mAP_4814.pt"
    torch.save({"model": official_state_dict("tiny")}, path)
    return path


@pytest.fixture(scope="module")
def hf_tiny(official_tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "ced-tiny"
    assert export.main(["--checkpoint", str(official_tiny), "--format", "hf", "--out", str(out)]) == 0
    return out


def test_written_tensor_names_are_the_released_ones(tmp_path):
    torch.manual_seed(0)
    model = create_model("ced_test", num_classes=3)
    write_hf(model, tmp_path, ["a", "b", "c"])
    tensors = load_file(tmp_path / "model.safetensors")
    assert sorted(tensors) == HF_NAMES_CED_TEST
    torch.testing.assert_close(tensors["encoder.init_bn.running_var"], model.init_bn[1].running_var, rtol=0, atol=0)
    torch.testing.assert_close(tensors["outputlayer.1.weight"], model.outputlayer[1].weight, rtol=0, atol=0)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["CedForAudioClassification"] and config["model_type"] == "ced"
    assert (config["embed_dim"], config["depth"], config["num_heads"], config["outputdim"]) == (64, 2, 2, 3)
    assert config["id2label"] == {"0": "a", "1": "b", "2": "c"} and config["label2id"] == {"a": 0, "b": 1, "c": 2}


def test_official_weights_written_as_hf_tag_like_the_official_model(hf_tiny, tmp_path, capsys):
    config = json.loads((hf_tiny / "config.json").read_text())
    assert config["name"] == "ced-tiny" and config["outputdim"] == 527
    assert config["id2label"]["0"] == "Speech" and len(config["id2label"]) == 527
    names = json.loads(str(FIXTURE["model/clip_names"]))
    clip = names.index("10s")
    wav = tmp_path / "10s.wav"
    sf.write(wav, make_waveform(*PARITY_CLIPS["10s"]), 16000, subtype="FLOAT")
    assert tag.main([str(wav), "--checkpoint", str(hf_tiny), "--json", "--top-k", "527", "--chunk-seconds", "10"]) == 0
    (chunk,) = json.loads(capsys.readouterr().out)["results"][0]["chunks"]
    probs = np.zeros(527)
    for label in chunk["labels"]:
        probs[label["index"]] = label["probability"]
    np.testing.assert_allclose(probs, FIXTURE["tiny/probs"][clip], rtol=0, atol=1e-5)
    # Full precision in the JSON: no value is a short rounding of the float32 output.
    assert any(len(repr(label["probability"])) > 8 for label in chunk["labels"])
    labels = load_class_labels().names
    assert all(label["label"] == labels[label["index"]] for label in chunk["labels"])


def test_round_trip_hf_ours_hf_is_tensor_identical_and_outputs_agree(official_tiny, hf_tiny, tmp_path):
    again = tmp_path / "again"
    assert export.main(["--checkpoint", str(hf_tiny), "--format", "hf", "--out", str(again)]) == 0
    first, second = load_file(hf_tiny / "model.safetensors"), load_file(again / "model.safetensors")
    assert sorted(first) == sorted(second)
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert json.loads((again / "config.json").read_text()) == json.loads((hf_tiny / "config.json").read_text())
    official, from_hf = load_checkpoint(official_tiny), load_checkpoint(hf_tiny / "model.safetensors")
    waveform = torch.randn(2, 48000) * 0.1
    with torch.no_grad():
        torch.testing.assert_close(from_hf(waveform), official(waveform), rtol=0, atol=1e-6)


def test_hf_directory_is_accepted_as_teacher_and_init(hf_tiny):
    ensemble = load_ensemble([hf_tiny])
    assert ensemble.num_classes == 527
    (source,) = ensemble.sources
    assert source == describe_checkpoint(hf_tiny) and source["file"] == "ced-tiny"
    student = create_model("ced_tiny", num_classes=10)
    summary = init_from_checkpoint(student, hf_tiny)
    assert "patch_embed.proj.weight" in summary.loaded and not summary.head_loaded


def test_pytorch_model_bin_revision_loads(hf_tiny, tmp_path):
    (tmp_path / "config.json").write_text((hf_tiny / "config.json").read_text())
    torch.save(load_file(hf_tiny / "model.safetensors"), tmp_path / "pytorch_model.bin")
    a, b = load_checkpoint(tmp_path), load_checkpoint(hf_tiny)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_name_preset_decides_width_as_in_the_official_config(hf_tiny, tmp_path):
    config = json.loads((hf_tiny / "config.json").read_text())
    config.update(embed_dim=768, num_heads=12)  # CedConfig(name="ced-tiny") ignores these
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").symlink_to(hf_tiny / "model.safetensors")
    assert load_checkpoint(tmp_path).embed_dim == 192


@pytest.mark.parametrize(("field", "value", "message"), [
    ("pooling", "token", "pooling='token' is not supported"),
    ("n_mels", 128, "n_mels=128 is not supported"),
    ("patch_stride", 10, "patch_stride=10 differs"),
    ("outputdim", 10, "id2label has 527 names, outputdim is 10"),
])
def test_unsupported_config_is_one_line_error_naming_the_field(hf_tiny, tmp_path, capsys, field, value, message):
    config = json.loads((hf_tiny / "config.json").read_text())
    config[field] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").symlink_to(hf_tiny / "model.safetensors")
    wav = tmp_path / "a.wav"
    sf.write(wav, np.zeros(16000), 16000)
    assert tag.main([str(wav), "--checkpoint", str(tmp_path)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert message in line and "config.json" in line


def test_foreign_tensor_names_are_refused(hf_tiny, tmp_path):
    (tmp_path / "config.json").write_text((hf_tiny / "config.json").read_text())
    tensors = load_file(hf_tiny / "model.safetensors")
    tensors["decoder.weight"] = torch.zeros(1)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="decoder.weight"):
        load_checkpoint(tmp_path)


def test_a_student_exports_its_own_class_names_and_they_tag_back(tmp_path, capsys):
    torch.manual_seed(0)
    student = tmp_path / "student.pt"
    torch.save({"model": create_model("ced_test", num_classes=3).state_dict()}, student)
    out = tmp_path / "hf"
    assert export.main(["--checkpoint", str(student), "--format", "hf", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--labels" in err and len(err.strip().splitlines()) == 1
    labels = tmp_path / "labels.csv"
    labels.write_text('index,mid,display_name\n0,/m/a,Dog\n1,/m/b,"Bark, loud"\n2,/m/c,Cat\n')
    assert export.main(["--checkpoint", str(student), "--format", "hf", "--out", str(out), "--labels", str(labels)]) == 0
    capsys.readouterr()
    wav = tmp_path / "a.wav"
    sf.write(wav, 0.1 * np.random.default_rng(0).standard_normal(16000), 16000)
    assert tag.main([str(wav), "--checkpoint", str(out), "--json", "--top-k", "3"]) == 0
    (chunk,) = json.loads(capsys.readouterr().out)["results"][0]["chunks"]
    assert {label["label"] for label in chunk["labels"]} == {"Dog", "Bark, loud", "Cat"}
