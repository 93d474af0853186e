"""`pdserve autoscale --replay`, `pdserve bench trace` and `pdserve schema autoscaling`, end to
end through `main` on temporary files."""

import json

import pytest

from pdserve.cli.autoscale import TIMELINE_LINES, timeline_lines
from pdserve.cli.main import main

POLICY = """\
interval_s: 10
window_s: 30
gpu_cost_per_hour: {H100: 4.0, L4: 0.8}
prefill: {accelerator_type: H100, max_replicas: 4, upscale_delay_s: 20, downscale_delay_s: 60}
decode: {accelerator_type: L4, max_replicas: 8, upscale_delay_s: 20, downscale_delay_s: 60}
"""


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's own errors
        return int(exc.code)


@pytest.fixture
def files(tmp_path):
    (tmp_path / "policy.yaml").write_text(POLICY)
    assert main(["bench", "trace", "--workload", "chat", "--phases", "0.5:120,2:120,0.5:240", "--seed", "2",
                 "--out", str(tmp_path / "trace.jsonl")]) == 0
    return tmp_path


def test_bench_trace_writes_a_trace_and_says_how_many_requests(files, capsys):
    assert main(["bench", "trace", "--phases", "1:60", "--arrival", "gamma", "--burstiness", "3",
                 "--out", str(files / "t.jsonl")]) == 0
    written = len((files / "t.jsonl").read_text().splitlines())
    assert f"wrote {written} requests over 60 s (chat, gamma arrivals)" in capsys.readouterr().out
    assert _exit_code(["bench", "trace", "--phases", "1:60,fast", "--out", str(files / "x.jsonl")]) == 2
    assert "'fast' is not RATE:DURATION_S" in capsys.readouterr().err


def test_replay_prints_the_timeline_attainment_gpu_hours_and_cost_and_writes_json_and_png(files, capsys):
    out = files / "out"
    assert main(["autoscale", "--policy", str(files / "policy.yaml"), "--replay", str(files / "trace.jsonl"),
                 "--startup-s", "30", "--initial-replicas", "1,2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "replay.json").read_text())
    s = report["summary"]
    assert report["options"]["initial_replicas"] == {"prefill": 1, "decode": 2}
    assert report["timeline"][0]["ready"] == {"prefill": 1, "decode": 2}
    assert f"predicted SLO attainment {s['attainment']:.1%}" in printed
    assert f"GPU-hours: H100 {s['gpu_hours']['H100']:.2f}, L4 {s['gpu_hours']['L4']:.2f}; cost {s['cost']:.2f}" in printed
    assert s["cost"] == pytest.approx(4.0 * s["gpu_hours"]["H100"] + 0.8 * s["gpu_hours"]["L4"])
    assert "replicas ready 30 s after they are requested" in printed
    assert (out / "replay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_replay_json_prints_the_report_on_one_line(files, capsys):
    assert main(["autoscale", "--policy", str(files / "policy.yaml"), "--replay", str(files / "trace.jsonl"),
                 "--noise", "0.2", "--seed", "3", "--out", str(files / "out"), "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    report = json.loads(lines[0])
    assert report["options"]["noise"] == 0.2 and len(report["timeline"]) == 48


def test_a_long_timeline_prints_a_sample_with_every_change_of_size():
    rows = [{"t_s": 10.0 * i, "arrival_rps": 1.0, "wanted": {"prefill": 1, "decode": 1 + (i >= 250)},
             "ready": {"prefill": 1, "decode": 1 + (i >= 256)}, "ttft_ms": 700.0, "tpot_ms": None,
             "attainment": 1.0} for i in range(500)]
    lines = timeline_lines({"timeline": rows})
    shown = [line for line in lines[2:] if ":" in line.split()[0]]
    assert len(shown) <= TIMELINE_LINES
    assert any(line.split()[0] == "41:40" and "2/1" in line for line in shown)  # decode asked for at row 250
    assert any(line.split()[0] == "42:40" and "2/2" in line for line in shown)  # and ready at row 256
    assert "intervals shown" in lines[-1]


def test_schema_autoscaling_prints_the_policy_json_schema_with_descriptions(capsys):
    assert main(["schema", "autoscaling"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert {"prefill", "decode", "interval_s", "gpu_cost_per_hour"} <= set(schema["properties"])
    assert "between decisions" in schema["properties"]["interval_s"]["description"]
    assert "TTFT objective" in schema["$defs"]["PrefillScaling"]["properties"]["ttft_ms"]["description"]


@pytest.mark.parametrize("policy, trace, words", [
    ("prefill: {max_replicas: 0}\n", None, "prefill.max_replicas"),
    ("decode: {tpot_ms: fast}\n", None, "decode.tpot_ms"),
    (None, '{"arrival_s": 1, "prompt_tokens": 8}\n', "trace.jsonl:1: output_tokens"),
])
def test_a_bad_policy_or_trace_exits_2_naming_what_is_wrong(files, capsys, policy, trace, words):
    if policy is not None:
        (files / "policy.yaml").write_text(policy)
    if trace is not None:
        (files / "trace.jsonl").write_text(trace)
    assert main(["autoscale", "--policy", str(files / "policy.yaml"), "--replay", str(files / "trace.jsonl"),
                 "--out", str(files / "out")]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
    assert not (files / "out").exists()


def test_bad_replay_options_exit_2(files, capsys):
    base = ["autoscale", "--policy", str(files / "policy.yaml"), "--replay", str(files / "trace.jsonl")]
    assert _exit_code([*base, "--initial-replicas", "3"]) == 2
    assert "PREFILL,DECODE" in capsys.readouterr().err
    assert _exit_code([*base, "--startup-s", "-5"]) == 2
    assert "expected a number >= 0" in capsys.readouterr().err
