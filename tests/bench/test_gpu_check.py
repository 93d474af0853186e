"""The GPU check runs here on CPU tensors, as it must on the lent GPU machine: without vLLM, every
byte of a paged cache in vLLM's GPU layout arriving over both paths, its figures in one JSON line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_gpu_check_moves_every_byte_over_both_paths_without_vllm(tmp_path):
    fake = tmp_path / "fake_no_vllm" / "vllm"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('the GPU machine has no vLLM')\n")
    env = {**os.environ, "PYTHONPATH": f"{fake.parent}{os.pathsep}{ROOT}"}
    proc = subprocess.run(
        [sys.executable, "-m", "pdserve.bench.gpu_check", "--layers", "3", "--prompt-tokens", "100",
         "--repeats", "1", "--expert-steps", "3"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["device"] == "cpu" and report["shape"]["layers"] == 3
    grpc, local = report["kv"]["grpc"], report["kv"]["same_node"]
    for path in (grpc, local):
        assert path["all_bytes_ok"] and not path["errors"]
        assert path["mib"] == 3 * 7 * 2 * 16 * 8 * 128 * 2 / 2**20  # 3 layers of 7 blocks (100 tokens), bf16
        assert path["gb_s"] > 0 and path["held_ms_per_layer"] >= 0
    assert (grpc["same_node_used"], local["same_node_used"]) == (False, True)
    experts = report["experts"]
    assert experts["stall_ms_without_prefetch"] > 0 and experts["overlap"] is None  # no copy stream on CPU


def test_the_gpu_check_script_is_valid_shell():
    assert subprocess.run(["sh", "-n", str(ROOT / "bench" / "gpu_check.sh")]).returncode == 0
