"""The test run itself: no caller variable reaches a test, no test can hang CI."""

from __future__ import annotations

import os
import sys
import time

import pytest

from helpers import ENV_VARS, run_until_stalled, spawn_bounded


def test_the_projects_variables_never_reach_a_test():
    # .ci/run sets each of them to a path that does not exist, so this fails there if the clearing breaks.
    assert [name for name in ENV_VARS if name in os.environ] == []


def test_every_test_runs_under_a_timeout(request):
    assert request.config.pluginmanager.hasplugin("timeout")
    assert 0 < float(request.config.getini("timeout")) <= 1800


def _sleep_forever(rank: int) -> None:
    time.sleep(3600)


def test_spawned_processes_that_hang_are_killed_and_reported():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="2 spawned processes still running after 3 s"):
        spawn_bounded(_sleep_forever, (), nprocs=2, timeout_s=3)
    assert time.monotonic() - start < 30


def test_a_slow_command_that_keeps_making_progress_runs_to_its_end(tmp_path):
    # 6 s in all, never more than 0.5 s without output: longer than the 4 s stall limit, yet never stalled.
    script = "import time\nfor i in range(12):\n    print(i, flush=True)\n    time.sleep(0.5)\n"
    result = run_until_stalled([sys.executable, "-c", script], cwd=tmp_path, env=dict(os.environ), watch=tmp_path,
                               stall_s=4.0)
    assert result.returncode == 0 and result.stdout.split() == [str(i) for i in range(12)]


def test_a_command_without_output_or_written_files_is_killed_as_stalled(tmp_path):
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="no output and no file written"):
        run_until_stalled([sys.executable, "-c", "import time; time.sleep(3600)"], cwd=tmp_path,
                          env=dict(os.environ), watch=tmp_path, stall_s=3.0)
    assert time.monotonic() - start < 30
