"""Engine processes end when the process that started them is killed outright, as vLLM's own
engine processes do not (they were found orphaned, holding gigabytes, long after `pdserve serve`
was killed): the watchdog that vLLM loads in each of its processes as a general plugin."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from importlib.metadata import entry_points

import psutil
import pytest

from pdserve.prefill import engine_watchdog

# A parent that starts a child like an engine process (the watchdog's plugin hook called in it),
# prints the child's pid and waits to be killed.
PARENT = textwrap.dedent("""
    import os, subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c",
        "from pdserve.prefill.engine_watchdog import register; register(); import time; time.sleep(120)"],
        env={**os.environ, "PDSERVE_ENGINE_WATCHDOG": sys.argv[1]})
    print(child.pid, flush=True)
    time.sleep(120)
""")


def _orphan_after_parent_killed(watchdog: str) -> psutil.Process:
    parent = subprocess.Popen([sys.executable, "-c", PARENT, watchdog], stdout=subprocess.PIPE, text=True)
    child = psutil.Process(int(parent.stdout.readline()))
    time.sleep(0.5)  # the child has registered
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    return child


@pytest.mark.slow
def test_an_engine_process_ends_within_seconds_of_its_parent_being_killed():
    child = _orphan_after_parent_killed("1")
    gone, alive = psutil.wait_procs([child], timeout=engine_watchdog.POLL_S * 5)
    assert child in gone and not alive


@pytest.mark.slow
def test_without_pdserve_setting_it_a_vllm_process_is_left_alone():
    child = _orphan_after_parent_killed("")
    try:
        _, alive = psutil.wait_procs([child], timeout=engine_watchdog.POLL_S * 3)
        assert alive == [child]
    finally:
        child.kill()


def test_vllm_finds_the_watchdog_among_its_general_plugins():
    plugins = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert plugins.get("pdserve_engine_watchdog") == "pdserve.prefill.engine_watchdog:register"
