"""`pdserve serve` as a user runs it: the default configuration (ports moved to free
ones), the README's curl and openai examples as written, then Ctrl-C, which must
leave no process behind."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pdserve.ports import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def _readme_example(name: str) -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"<!-- readme-example: {name} -->\n```\w+\n(.*?)```", text, re.S)
    assert m, f"README has no {name} example"
    return m.group(1)


def _wait_for_line(proc: subprocess.Popen, needle: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    seen = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        if needle in line:
            return "".join(seen)
    raise AssertionError(f"pdserve serve never printed {needle!r}; output:\n{''.join(seen)}")


def test_serve_answers_the_readme_examples_and_ctrl_c_leaves_no_process(tmp_path):
    http_port, grpc_port, direct_port = free_port(), free_port(), free_port()
    config = tmp_path / "cluster.yaml"
    config.write_text(f"ingress: {{http_port: {http_port}, grpc_port: {grpc_port}, direct_http_port: {direct_port}}}\n")
    pdserve = Path(sys.executable).with_name("pdserve")
    proc = subprocess.Popen([str(pdserve), "serve", "--config", str(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    descendants: set[int] = set()
    try:
        banner = _wait_for_line(proc, "Press Ctrl-C to stop.", timeout_s=400)
        assert all(f"127.0.0.1:{port}" in banner for port in (http_port, grpc_port, direct_port))
        assert "; float32)" in banner  # the default dtype answers right on every CPU (bfloat16 does not on AMX)
        descendants = {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}

        for port in (http_port, direct_port):  # through Serve's proxy, and from the ingress's own server
            curl = _readme_example("curl").replace("8000", str(port)).replace("\\\n", " ")
            out = subprocess.run(curl, shell=True, capture_output=True, text=True, timeout=120, check=True).stdout
            answer = json.loads(out)
            assert answer["choices"][0]["message"]["content"] == "The capital of France is Paris."

        snippet = _readme_example("openai").replace("8000", str(http_port))
        printed = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=120)
        assert printed.returncode == 0, printed.stderr
        assert printed.stdout.strip() == "The capital of France is Paris."

        for example, expected in (("openai-json", "Paris"), ("openai-tools", 'get_weather {"city": "Paris"}')):
            snippet = _readme_example(example).replace("8000", str(http_port))
            printed = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=120)
            assert printed.returncode == 0, printed.stderr
            assert printed.stdout.strip() == expected

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        alive = [pid for pid in descendants if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
        if not alive:
            break
        time.sleep(1)
    assert not alive, [psutil.Process(pid).cmdline()[:3] for pid in alive if psutil.pid_exists(pid)]
