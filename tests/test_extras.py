"""Each optional extra of pyproject.toml, absent: the CLI that needs it says so in one line naming the pip command,
exits 2 and writes nothing (ced_train/extras.py). The extra's modules are blocked inside the CLI's own process: a None
in sys.modules makes their import fail as if they were not installed, and Hydra's plugin scan skips such a module as
it would a plugin that is not there."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ced_train.extras import MissingExtra, require
from helpers import make_shards

FIXTURES = Path(__file__).parent / "fixtures"
EXPORT_MODULES = ("onnx", "onnxruntime", "onnxscript")
SLURM_MODULES = ("hydra_plugins.hydra_submitit_launcher", "submitit")

# Runs `python -m MODULE ARGS...` with the comma-separated modules of argv[1] blocked.
RUN_WITHOUT = """
import runpy, sys
for name in sys.argv[1].split(","):
    sys.modules[name] = None
sys.argv = sys.argv[2:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def run_without(blocked: tuple[str, ...], module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RUN_WITHOUT, ",".join(blocked), module, *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def tree(root: Path) -> list[Path]:
    return sorted(root.rglob("*"))


def assert_refused(result: subprocess.CompletedProcess, line: str) -> None:
    """Exit 2, nothing on stdout, and exactly `line` on stderr (no traceback, no Hydra help)."""
    assert (result.returncode, result.stdout, result.stderr) == (2, "", line + "\n"), result.stderr[-3000:]


def test_require_names_the_feature_the_extra_its_pip_command_and_the_missing_module(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    require("export", "json", feature="a feature")  # what imports is fine
    with pytest.raises(MissingExtra) as refused:
        require("export", "json", "onnxscript", feature="ONNX export")
    assert str(refused.value) == ("ONNX export needs the 'export' extra: pip install 'ced-train[export]' "
                                  "(missing module onnxscript)")


@pytest.mark.parametrize(("blocked", "quantize", "line"), [
    (EXPORT_MODULES, "none", "ONNX export needs the 'export' extra: pip install 'ced-train[export]' "
                             "(missing module onnx)"),
    # onnx and onnxscript present (the fp32 export would run) but not the quantiser: refused before exporting
    (("onnxruntime",), "int8", "ONNX export with --quantize int8 needs the 'export' extra: "
                               "pip install 'ced-train[export]' (missing module onnxruntime)"),
], ids=["fp32", "int8"])
def test_onnx_export_without_the_export_extra_is_one_line_and_writes_nothing(tmp_path, blocked, quantize, line):
    result = run_without(blocked, "ced_train.export", "--checkpoint", FIXTURES / "demo_student",
                         "--out", tmp_path / "models" / "ced_tiny.onnx", "--quantize", quantize, cwd=tmp_path)
    assert_refused(result, f"error: {line}")
    assert tree(tmp_path) == []  # neither the model, nor its temporary directory, nor the directory of --out


@pytest.mark.parametrize("cli", ["tag", "serve"])
def test_tagging_an_onnx_model_without_the_export_extra_is_one_line(tmp_path, cli):
    model = tmp_path / "ced_tiny.onnx"
    model.write_bytes(b"never read: the missing runtime is found first")
    args = [FIXTURES / "official_logits" / "audio" / "clip_a.flac"] if cli == "tag" else ["--port", "0"]
    result = run_without(EXPORT_MODULES, f"ced_train.{cli}", "--checkpoint", model, *args, cwd=tmp_path)
    assert_refused(result, "error: tagging with an ONNX model needs the 'export' extra: "
                           "pip install 'ced-train[export]' (missing module onnxruntime)")


def test_import_official_without_the_official_extra_is_one_line_and_writes_no_store(tmp_path):
    shards = make_shards(tmp_path / "shards", [2.0, 3.0], samples_per_shard=2)
    before = tree(tmp_path)
    result = run_without(("pyarrow",), "ced_train.store", "import-official", FIXTURES / "official_logits" / "logits",
                         "--shards", shards, "--out", tmp_path / "stores" / "paper.h5", "--no-progress", cwd=tmp_path)
    assert_refused(result, "error: reading the paper's released outputs (their parquet files) needs the 'official' "
                           "extra: pip install 'ced-train[official]' (missing module pyarrow)")
    assert tree(tmp_path) == before


@pytest.mark.parametrize("launcher", ["slurm", "slurm_local"])
def test_a_submitit_launcher_without_the_slurm_extra_is_one_line_before_hydra_starts(tmp_path, launcher):
    """The documented sweeps (docs/recipes.md); without the plugin Hydra itself only reports that it cannot load
    the config hydra/launcher/submitit_*, in 8 lines and exit 1."""
    result = run_without(SLURM_MODULES, "ced_train", "-m", f"hydra/launcher={launcher}", "+recipe=tiny_distill",
                         "seed=0,1", cwd=tmp_path)
    assert_refused(result, f"error: hydra/launcher={launcher} needs the 'slurm' extra: "
                           "pip install 'ced-train[slurm]' (missing module hydra_plugins.hydra_submitit_launcher)")
    assert tree(tmp_path) == []  # no run or sweep directory
