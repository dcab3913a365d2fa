"""Checkpoints are unpickled with torch's safe loader only: a file that needs more is refused, unless trusted."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from ced_train import export, tag
from ced_train.models import CheckpointError, create_model, init_from_checkpoint, load_checkpoint, read_checkpoint


class _SideEffect:
    """Unpickling this object runs `Path.touch(marker)`: what a malicious "checkpoint" would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        from pathlib import Path
        return Path.touch, (Path(self.marker),)


@pytest.fixture
def booby_trapped(tmp_path):
    marker = tmp_path / "side_effect_ran"
    path = tmp_path / "downloaded.ckpt"
    torch.save({"model": create_model("ced_test").state_dict(), "extra": _SideEffect(str(marker))}, path)
    return path, marker


def test_a_pickle_with_a_side_effect_is_refused_and_nothing_runs(booby_trapped, tmp_path, capsys):
    path, marker = booby_trapped
    with pytest.raises(CheckpointError, match="refused") as error:
        read_checkpoint(path)
    assert str(path) in str(error.value) and "--trust-checkpoint" in str(error.value)
    with pytest.raises(CheckpointError):
        init_from_checkpoint(create_model("ced_test"), path)
    wav = tmp_path / "a.wav"
    sf.write(wav, np.zeros(16000), 16000)
    for main, argv in ((tag.main, [str(wav)]), (export.main, ["--out", str(tmp_path / "m.onnx")])):
        assert main([*argv, "--checkpoint", str(path)]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert str(path) in line and "refused" in line
    assert not marker.exists()


def test_the_trust_option_is_explicit(booby_trapped):
    path, marker = booby_trapped
    model = load_checkpoint(path, trust=True)
    assert marker.exists() and model.num_classes == 527


def test_official_layout_with_numpy_metadata_loads_safely(tmp_path):
    torch.manual_seed(0)
    state = create_model("ced_test").state_dict()
    path = tmp_path / "official.pt"
    torch.save({"model": state, "epoch": np.int64(30), "mAP": np.float64(0.4814), "dtype": np.dtype("float32")}, path)
    loaded, _ = read_checkpoint(path)
    assert all(torch.equal(loaded[key], state[key]) for key in state)
