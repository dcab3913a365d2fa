"""The test run itself: no caller variable reaches a test, no test can hang CI."""

from __future__ import annotations

import os
import time

import pytest

from helpers import ENV_VARS, spawn_bounded


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
