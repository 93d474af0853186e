"""Engines die with the process that started them.

vLLM runs an engine in child processes (EngineCore, and its Worker on CPUs). When their parent,
an engine replica or a test's engine process, is killed outright (SIGKILL, OOM), nothing tells
them: they were found running, re-parented to init, 17 minutes after `pdserve serve` was killed,
each holding gigabytes. vLLM loads its general plugins in every one of its processes; this one
(`vllm.general_plugins` entry point in pyproject.toml) starts a thread there that ends the process
once its parent is gone. It does nothing unless `WATCHDOG_ENV` is set, which pdserve's engine
builders set, so other uses of vLLM in the same environment are left alone.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

log = logging.getLogger("pdserve.engine")

WATCHDOG_ENV = "PDSERVE_ENGINE_WATCHDOG"
"""Set to "1" in a process that starts engines; its engine processes inherit it."""
POLL_S = 1.0

_started = False


def register() -> None:
    """vLLM's plugin hook, called once or more in each of its processes."""
    global _started
    if os.environ.get(WATCHDOG_ENV) != "1" or _started:
        return
    _started = True
    parent = os.getppid()
    threading.Thread(target=_watch, args=(parent,), name="pdserve-engine-watchdog", daemon=True).start()


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(POLL_S)
    log.error("engine process %d: its parent %d is gone; ending it", os.getpid(), parent)
    os.kill(os.getpid(), signal.SIGKILL)  # its own children see this process go, and follow
