from pdserve.bench.loadgen import RequestResult, RequestSpec
from pdserve.bench.slo_compare import summarize


def _result(outcome: str, ttft_ms=None, tpot_ms=None, e2e_ms=10.0) -> RequestResult:
    return RequestResult("chat", outcome, 200 if outcome == "ok" else 429, ttft_ms, tpot_ms, e2e_ms, 4, None, None)


def test_each_request_is_judged_against_its_own_objectives():
    specs = [RequestSpec(0, "a", 4, "chat", 100, 10), RequestSpec(0, "b", 4, "long", 1000, 10),
             RequestSpec(0, "c", 4, "long", 1000, 10), RequestSpec(0, "d", 4, "chat", 100, 10)]
    results = [_result("ok", 90, 9), _result("ok", 900, 11), _result("ok", 500, None),
               _result("rejected", e2e_ms=7.0)]
    s = summarize(specs, results, duration_s=2.0)
    assert (s["met"], s["ok"], s["rejected"]) == (2, 3, 1)  # b missed its TPOT only
    assert s["goodput_rps"] == 1.0 and s["attainment_all"] == 0.5 and s["attainment_admitted"] == 0.667
    assert s["reject_ms"]["p99"] == 7.0
