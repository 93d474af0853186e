"""The e2e helpers' Ray start: a start whose raylet misses Ray's registration deadline is cleaned up and retried."""

from __future__ import annotations

import subprocess
import sys

import psutil
import pytest
import ray

from tests.deployments import service_fixtures

TIMEOUT = Exception("The current node timed out during startup. This could happen because ...")


def test_a_start_that_times_out_is_killed_and_tried_again(monkeypatch):
    left_behind: list[tuple[subprocess.Popen, psutil.Process]] = []
    calls = []

    def fake_init(**kwargs):
        calls.append(kwargs)
        if len(calls) == 1:
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
            left_behind.append((child, psutil.Process(child.pid)))
            raise TIMEOUT

    monkeypatch.setattr(ray, "init", fake_init)
    with pytest.warns(UserWarning, match="Ray start 1 of 3 failed"):
        service_fixtures.init_ray(num_cpus=3)
    assert len(calls) == 2 and calls[1]["num_cpus"] == 3
    child, proc = left_behind[0]
    assert not proc.is_running(), "the failed start's process was not killed"
    child.wait()


def test_other_start_errors_and_the_last_timeout_are_raised(monkeypatch):
    errors = iter([ValueError("bad resources")])

    def fake_init(**kwargs):
        raise next(errors)

    monkeypatch.setattr(ray, "init", fake_init)
    with pytest.raises(ValueError, match="bad resources"):
        service_fixtures.init_ray()

    monkeypatch.setattr(ray, "init", lambda **kwargs: (_ for _ in ()).throw(TIMEOUT))
    with pytest.warns(UserWarning), pytest.raises(Exception, match="timed out during startup"):
        service_fixtures.init_ray()
