"""`pdserve bench experts` end to end on the generated MoE model: a report whose every setting
answered token for token like all experts resident, and whose hit rate grows with the slots."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_bench_experts_writes_a_report_and_plot_with_identical_outputs_at_every_setting(tmp_path) -> None:
    out = tmp_path / "experts"
    run = subprocess.run(
        [sys.executable, "-m", "pdserve.cli.main", "bench", "experts", "--resident-pct", "13,50,100",
         "--policies", "lifo,pinned_hot", "--batch", "6", "--output-tokens", "32", "--repeats", "1",
         "--out", str(out), "--quiet"],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((out / "experts.json").read_text())
    assert (out / "experts.png").stat().st_size > 10_000
    results = report["results"]
    assert [(r["resident_pct"], r["slots"], r["policy"]) for r in results] == [
        (13, 3, "lifo"), (13, 3, "pinned_hot"), (50, 8, "lifo"), (50, 8, "pinned_hot"),
        (100, 16, "lifo"), (100, 16, "pinned_hot")]
    assert all(r["identical_to_all_resident"] for r in results)  # batches of 6 at 3 slots run in rounds
    by_slots = {r["slots"]: r["hit_rate"] for r in results if r["policy"] == "lifo"}
    assert by_slots[3] < by_slots[8] < by_slots[16] == 1.0
    assert all(r["bytes_moved_per_token"] == 0 for r in results if r["slots"] == 16)
    assert "goal at 50% (lifo)" in run.stdout and report["all_resident_tokens_per_s"] > 0
