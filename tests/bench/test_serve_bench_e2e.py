"""`pdserve bench serve` end to end: a short sweep of two workloads over colocated, disaggregated and
adaptive services on real engines, judged at SLO scales, a TTFT x TPOT grid and absolute objectives; its
report has every field the README documents, and its plots are written."""

import json
import re
from pathlib import Path

import pytest

from pdserve.bench import plots, serve_bench, serve_report, serve_settings
from pdserve.bench.workloads import LengthDist, Workload
from pdserve.model_store import resolve_model
from tests.deployments.service_fixtures import init_ray, service_config

README = Path(__file__).resolve().parents[2] / "README.md"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def documented_fields(table: str) -> list[str]:
    """The JSON paths listed in one of the README's report tables (first column, in backticks)."""
    text = README.read_text()
    section = text.split(f"<!-- {table} -->")[1].split(f"<!-- /{table} -->")[0]
    return re.findall(r"^\| `([^`]+)` \|", section, flags=re.MULTILINE)


def missing(doc: object, path: str) -> list[str]:
    """Where `path` is absent from `doc`: `<name>` stands for every key of a mapping (at least
    one), `[]` for every element of a list (at least one)."""
    head, _, rest = path.partition(".")
    key, is_list = head.removesuffix("[]"), head.endswith("[]")
    if key.startswith("<"):
        if not isinstance(doc, dict) or not doc:
            return [path]
        values = list(doc.values())
    elif isinstance(doc, dict) and key in doc:
        values = [doc[key]]
    else:
        return [path]
    if is_list:
        if not all(isinstance(v, list) and v for v in values):
            return [path]
        values = [item for v in values for item in v]
    return [f"{head}.{m}" for v in values for m in missing(v, rest)] if rest else []


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    import ray

    init_ray()
    try:
        tiny = Workload(name="tiny", source="this test",
                        prompt_tokens=LengthDist(mean=40, sigma=0.3), output_tokens=LengthDist(mean=6, sigma=0.2))
        longer = Workload(name="longer", source="this test",
                          prompt_tokens=LengthDist(mean=200, sigma=0.1), output_tokens=LengthDist(mean=3, sigma=0.1))
        loose = serve_settings.AbsoluteObjective(name="loose", ttft_ms=600_000, tpot_ms=60_000)
        settings = serve_settings.ServeBenchSettings(requests_per_rate=4, rates_rps=[1.0], slo_scales=[2.0, 50.0],
                                                  ttft_scales=[50.0], tpot_scales=[2.0, 50.0], objectives_ms=[loose],
                                                  calibration_requests=2, calibration_max_tokens=4)
        rep = serve_bench.bench_configs(service_config(), str(resolve_model(None)),
                                        ["colocated", "disaggregated", "adaptive"], [tiny, longer], settings)
    finally:
        ray.shutdown()
    out = tmp_path_factory.mktemp("bench-serve")
    return rep, serve_report.write(rep, out), plots.write_all(rep["workloads"]["tiny"], out / "tiny")


def test_every_configuration_serves_every_request_and_reports_goodput(report):
    sweep, _, _ = report
    rep = sweep["workloads"]["tiny"]
    assert list(rep["configs"]) == ["colocated", "disaggregated", "adaptive"]
    for cfg in rep["configs"].values():
        (run,) = cfg["runs"]
        assert (run["rate_rps"], run["requests"], run["ok"]) == (1.0, 4, 4), run["errors"]
        assert all(r["output_tokens"] == r["requested_output_tokens"] and r["ttft_ms"] > 0 for r in run["per_request"])
        added = cfg["calibration"]["added_latency"]
        assert added["pairs"] == 2 and added["path"] == "ingress"  # with Serve's proxy measured alongside
        # Each answer is set against the engine its first token came from: a disaggregated answer
        # whose KV moved against the prefill engine's own.
        assert sum(added["first_token_from"].values()) == 2
        assert len(added["engines"]) == (2 if cfg is rep["configs"]["disaggregated"] else 1)
        assert added["via_proxy"]["service_ttft_ms"]["p50"] > 0 and added["via_proxy"]["http_ms"]["p50"] is not None
        # At 50x the unloaded latencies every request of a 1 req/s trickle meets its objectives.
        assert cfg["goodput"]["50"]["goodput_rps"] == cfg["goodput"]["ttft50x/tpot50x"]["goodput_rps"] == 1.0
        assert cfg["goodput"]["loose"]["goodput_rps"] == 1.0
        assert list(run["attainment"]) == ["2", "50", "ttft50x/tpot2x", "ttft50x/tpot50x", "loose"]
    kv = rep["configs"]["disaggregated"]["runs"][0]["kv_transfer"]
    assert kv["transfers"] == 4 and kv["failed"] == 0 and kv["bytes"]["p50"] > 0
    assert rep["configs"]["colocated"]["runs"][0]["kv_transfer"] is None
    assert rep["goal"]["slo_scale"] in (2.0, 50.0)
    assert list(rep["goal"]["by_setting"]) == ["ttft50x/tpot2x", "ttft50x/tpot50x", "loose"]
    # Every setting judged for adaptive too; at the loosest every mode served the whole trickle.
    assert list(rep["adaptive_goal"]) == ["2", "50", "ttft50x/tpot2x", "ttft50x/tpot50x", "loose"]
    assert rep["adaptive_goal"]["loose"] == {"adaptive_rps": 1.0, "best_fixed": "colocated", "best_fixed_rps": 1.0,
                                             "met": True}


def test_a_sweep_judges_each_workload_by_its_own_objectives_in_one_table(report):
    sweep, _, _ = report
    tiny, longer = sweep["workloads"]["tiny"], sweep["workloads"]["longer"]
    # Scales are of each workload's own unloaded latency: a 200-token prompt's TTFT is not a 40-token one's.
    assert longer["slo"]["reference"]["ttft_ms"] > tiny["slo"]["reference"]["ttft_ms"]
    for rep in (tiny, longer):
        assert all(cfg["runs"][0]["ok"] == 4 for cfg in rep["configs"].values())
    table = sweep["sweep"]
    assert [(r["workload"], r["key"]) for r in table["rows"]] == [
        (w, k) for w in ("tiny", "longer") for k in ("2", "50", "ttft50x/tpot2x", "ttft50x/tpot50x", "loose")]
    loose = next(r for r in table["rows"] if (r["workload"], r["key"]) == ("longer", "loose"))
    # Fixed rates: 1 req/s passed and nothing above it failed, so goodput is bounded below only.
    assert loose["goodput_rps"] == {"colocated": 1.0, "disaggregated": 1.0, "adaptive": 1.0}
    assert loose["upper_rps"] == {"colocated": None, "disaggregated": None, "adaptive": None}
    assert loose["ratio_bounds"]["adaptive"] == [0.0, None] and loose["adaptive_at_least_best_fixed"] is True
    assert (table["attainment_step"], table["attainment_step_ok"]) == (0.25, False)  # 4 requests: too few to trust
    assert table["adaptive_goal"]["of"] == 10


def test_report_has_every_field_the_readme_documents(report):
    _, path, _ = report
    written = json.loads(path.read_text())
    fields = documented_fields("bench-serve-json")
    assert len(fields) >= 20
    assert [m for f in fields for m in missing(written["workloads"]["tiny"], f)] == []
    sweep_fields = documented_fields("bench-serve-sweep-json")
    assert len(sweep_fields) >= 8
    assert [m for f in sweep_fields for m in missing(written, f)] == []


def test_plots_are_png_files(report):
    _, _, pngs = report
    assert sorted(p.name for p in pngs) == ["attainment.png", "goodput.png", "goodput_settings.png", "latency.png"]
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000
