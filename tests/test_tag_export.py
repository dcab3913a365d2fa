"""The tagging CLI (`python -m ced_train.tag`) and ONNX export (`python -m ced_train.export`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import soundfile as sf
import torch

from ced_train import export, tag
from ced_train.labels import load_class_labels
from ced_train.models import create_model
from tests.fixtures.reference_weights import PARITY_CLIPS, make_waveform

DEMO_STUDENT = Path(__file__).parent / "fixtures" / "demo_student"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "ced_test.pt"
    torch.save({"model": create_model("ced_test").state_dict()}, path)
    return path


def tone(seconds: float, rate: int, channels: int = 1) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    signal = 0.3 * np.sin(2 * np.pi * 440 * t)
    return np.stack([signal] * channels, axis=1) if channels > 1 else signal


@pytest.fixture(scope="module")
def audio_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("audio")
    files = {
        "a.wav": (tone(3.0, 16000), 16000),
        "b.flac": (tone(12.5, 44100, channels=2), 44100),
        "c.ogg": (tone(2.0, 22050), 22050),
        "d.mp3": (tone(1.5, 48000), 48000),
    }
    for name, (data, rate) in files.items():
        sf.write(folder / name, data, rate)
    (folder / "broken.wav").write_bytes(b"RIFF\x00\x00garbage")
    sf.write(folder / "empty.wav", np.zeros(0), 16000)
    return folder


def test_tags_every_common_format_with_one_row_per_chunk(audio_files, checkpoint, capsys):
    paths = [str(audio_files / n) for n in ("a.wav", "b.flac", "c.ogg", "d.mp3")]
    assert tag.main([*paths, "--checkpoint", str(checkpoint), "--top-k", "3", "--chunk-seconds", "5", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert [r["file"] for r in results] == paths
    assert [len(r["chunks"]) for r in results] == [1, 3, 1, 1]
    assert results[1]["duration_s"] == pytest.approx(12.5, abs=0.01)
    assert results[1]["chunks"][-1]["end_s"] == pytest.approx(12.5, abs=0.01)
    names = set(load_class_labels().names)
    for chunk in (c for r in results for c in r["chunks"]):
        probabilities = [label["probability"] for label in chunk["labels"]]
        assert len(probabilities) == 3 and probabilities == sorted(probabilities, reverse=True)
        assert all(label["label"] in names for label in chunk["labels"])


def test_a_trained_checkpoint_with_logit_pooling_is_tagged_with_probabilities(audio_files, checkpoint, tmp_path,
                                                                                capsys):
    state = torch.load(checkpoint)["model"]
    trained = tmp_path / "trained.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()},
                "ced_model": {"name": "ced_test", "num_classes": 527, "pooling": "logit"}}, trained)
    results = []
    for path in (checkpoint, trained):
        assert tag.main([str(audio_files / "a.wav"), "--checkpoint", str(path), "--json"]) == 0
        results.append(json.loads(capsys.readouterr().out)["results"])
    assert results[0] == results[1]
    assert all(0 < label["probability"] < 1 for label in results[1][0]["chunks"][0]["labels"])


def test_text_output_prints_display_names(audio_files, checkpoint, capsys):
    assert tag.main([str(audio_files / "a.wav"), "--checkpoint", str(checkpoint)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(str(audio_files / "a.wav"))
    assert len(out) == 1 + 1 + 5  # file line, one chunk line, five classes


def test_unreadable_file_is_one_line_error_and_the_others_are_still_tagged(audio_files, checkpoint, capsys):
    broken, missing, empty = audio_files / "broken.wav", audio_files / "absent.flac", audio_files / "empty.wav"
    files = [str(broken), str(audio_files / "a.wav"), str(missing), str(empty)]
    code = tag.main([*files, "--checkpoint", str(checkpoint), "--json"])
    captured = capsys.readouterr()
    assert code == 1
    errors = captured.err.strip().splitlines()
    assert len(errors) == 3
    assert all(str(path) in line for path, line in zip([broken, missing, empty], errors))
    assert [r["file"] for r in json.loads(captured.out)["results"]] == [str(audio_files / "a.wav")]


@pytest.mark.parametrize("tool", ["tag", "export"])
def test_wrong_checkpoint_is_one_line_error_naming_it_and_writes_nothing(audio_files, tmp_path, capsys, tool):
    bad = tmp_path / "not_a_model.pt"
    torch.save({"model": {"weight": torch.zeros(2)}}, bad)
    out = tmp_path / "model.onnx"
    if tool == "tag":
        assert tag.main([str(audio_files / "a.wav"), "--checkpoint", str(bad)]) == 2
    else:
        assert export.main(["--checkpoint", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(bad) in err[0]
    assert not out.exists()


def test_onnx_export_matches_torch_on_several_lengths(tmp_path, checkpoint, capsys):
    out = tmp_path / "model.onnx"
    assert export.main(["--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    session = onnxruntime.InferenceSession(str(out))
    model = tag.load_checkpoint(checkpoint)
    for batch, seconds in [(1, 1.0), (2, 4.0), (1, 23.7)]:
        waveform = torch.randn(batch, round(seconds * 16000)) * 0.1
        (probs,) = session.run(None, {"waveform": waveform.numpy()})
        with torch.no_grad():
            np.testing.assert_allclose(probs, model(waveform).numpy(), rtol=0, atol=1e-5)


def test_int8_export_of_the_trained_demo_student_drifts_at_most_a_hundredth(tmp_path, capsys):
    """The demo's distilled CED-Tiny (tests/fixtures/demo_student, HF layout, fp16 weights): every transformer and
    head weight matrix becomes int8, the front end stays float32, and probabilities move measurably but by at most
    0.01 against the fp32 graph."""
    import onnx

    fp32, int8 = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    assert export.main(["--checkpoint", str(DEMO_STUDENT), "--out", str(fp32)]) == 0
    assert export.main(["--checkpoint", str(DEMO_STUDENT), "--out", str(int8), "--quantize", "int8"]) == 0
    assert "int8" in capsys.readouterr().out
    graph = onnx.load(str(int8)).graph
    ops = [node.op_type for node in graph.node]
    assert ops.count("MatMulInteger") == 12 * 4 + 1  # qkv, proj, fc1, fc2 per block and the head
    assert "STFT" not in ops
    mel = [node for node in graph.node if node.op_type == "MatMul" and "front_end.mel_fb" in node.input]
    assert len(mel) == 1  # the filterbank product stays float32
    fp32_bytes = sum(path.stat().st_size for path in tmp_path.glob("fp32.onnx*"))
    assert int8.stat().st_size < 0.4 * fp32_bytes
    sessions = [onnxruntime.InferenceSession(str(path)) for path in (fp32, int8)]
    t = np.arange(160000) / 16000
    clips = [make_waveform(*PARITY_CLIPS[name]) for name in ("1s", "4s", "10s", "23.7s")]
    clips += [(0.3 * np.sin(2 * np.pi * f * t) + 0.01 * np.sin(2 * np.pi * 37 * t)).astype(np.float32)
              for f in (220, 1000, 4000)]
    drift = max(np.abs(np.subtract(*(s.run(None, {"waveform": clip[None]})[0] for s in sessions))).max()
                for clip in clips)
    assert 1e-5 < drift <= 0.01


@pytest.mark.parametrize("fmt", ["onnx", "hf"])
def test_a_full_disk_is_one_line_and_leaves_no_file(small_disk, fmt, capsys):
    out = small_disk / ("model.onnx" if fmt == "onnx" else "hf")
    assert export.main(["--checkpoint", str(DEMO_STUDENT), "--format", fmt, "--out", str(out)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: writing {out}:")
    assert [path for path in small_disk.rglob("*") if path.is_file()] == []
