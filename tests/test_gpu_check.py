"""benchmarks/gpu_check.py, the script a borrowed GPU runs once with no second try, run whole on the CPU (`--quick`)
as a real process, so that every section the CPU can do keeps working between GPU runs."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
COMMAND = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick"]
# What a CPU cannot measure, and why the script says so; everything else must have its figure.
CPU_SKIPS = {"ddp": "CPU process", "distill fp16 eager": "16-mixed as bf16-mixed"}
CPU_FIGURES = {"teach pass", "teach bare forward", "render on device", "distill bf16 eager data path",
               "distill bf16 eager cached", "evaluate stage", "evaluate bare"}


@pytest.mark.timeout(300)
def test_quick_cpu_run_measures_every_section_a_cpu_can_and_meets_its_checks(tmp_path):
    out = tmp_path / "gpu_check.json"
    run = subprocess.run([*COMMAND, "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    report = json.loads(out.read_text())

    assert set(report["figures"]) == CPU_FIGURES, report["skipped"]
    assert all(figure["rate"] > 0 for figure in report["figures"].values())
    assert report["failed"] == [] and report["stopped"] is None
    assert set(report["skipped"]) == set(CPU_SKIPS)
    for name, reason in CPU_SKIPS.items():
        assert reason in report["skipped"][name]
    assert report["figures"]["evaluate stage"]["clips"] == report["clips"]

    render_checks = {name: check for name, check in report["checks"].items() if name.startswith("render:")}
    assert len(render_checks) == 3 and all(check["met"] for check in render_checks.values()), render_checks
    # The second float32 front end differs from the first (else the bound was never put to the test), within it.
    assert 0 < report["checks"]["render: CPU, direct DFT vs FFT, max |difference| / bound"]["value"] < 1

    data_path = report["figures"]["distill bf16 eager data path"]
    # Timed after the workers' queue of prefetched batches was served, and within the first epoch.
    assert data_path["warmup_steps"] > report["settings"]["warmup_steps"]
    assert data_path["timed_steps"] >= 2
    assert data_path["warmup_steps"] + data_path["timed_steps"] <= data_path["epoch_batches"]
    assert report["figures"]["distill bf16 eager cached"]["warmup_steps"] == report["settings"]["warmup_steps"]


@pytest.mark.timeout(300)
def test_sigterm_mid_run_leaves_the_json_of_what_was_measured_and_no_process_behind(tmp_path):
    out = tmp_path / "gpu_check.json"
    # A session of its own, signalled as a group: what `timeout` does (the DataLoader workers get SIGTERM too).
    run = subprocess.Popen([*COMMAND, "--out", str(out)], cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        for line in run.stdout:
            if line.startswith("  render on device"):  # the distill fits and their workers start next
                os.killpg(run.pid, signal.SIGTERM)
                break
        # The end of the output comes once every process of the group has exited: none may linger.
        rest, _ = run.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == 128 + signal.SIGTERM, rest[-4000:]
    report = json.loads(out.read_text())
    assert report["stopped"].startswith("SIGTERM")
    assert {"teach pass", "teach bare forward", "render on device"} <= set(report["figures"])
    assert report["failed"] == []
