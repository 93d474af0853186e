"""What `pdserve bench serve` sends: the same lengths and arrivals at every rate, fresh prompt
contents per rate (so no run is prefilled from an earlier run's prefix cache); and how it searches
every objective setting on one set of runs."""

from transformers import AutoTokenizer

from pdserve.bench import conversations, engine_probe, serve_bench
from pdserve.bench.loadgen import RequestResult
from pdserve.bench.serve_bench import build_requests
from pdserve.bench.serve_settings import ServeBenchSettings, Target
from pdserve.bench.workloads import BUILT_IN, make_requests
from pdserve.model_store import resolve_model


def _result(ttft_ms: float, tpot_ms: float) -> RequestResult:
    return RequestResult(kind="load", outcome="ok", status=200, ttft_ms=ttft_ms, tpot_ms=tpot_ms,
                         e2e_ms=ttft_ms + 3 * tpot_ms, completion_tokens=4, retry_after_s=None, server_slo=None)


def test_every_rate_gets_the_same_lengths_with_prompts_no_other_run_has_sent():
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model(None)))
    settings = ServeBenchSettings(requests_per_rate=12, calibration_requests=4, seed=3)
    requests = build_requests(BUILT_IN["chat"], settings, tokenizer)
    slow, fast = requests.load_at(0.125), requests.load_at(0.25)
    assert [(len(r.prompt_token_ids), r.output_tokens) for r in slow] == requests.load_lengths
    assert [(len(r.prompt_token_ids), r.output_tokens) for r in fast] == requests.load_lengths
    assert requests.load_at(0.125) == slow  # the same at a rate, whichever configuration asks
    pairs = [r for probe in requests.probes for r in probe]
    first_blocks = [tuple(r.prompt_token_ids[:16]) for r in [*slow, *fast, *requests.calibration, *pairs, requests.warmup]]
    assert len(set(first_blocks)) == len(first_blocks)  # no two prompts share a prefix-cache block
    assert {len(r.prompt_token_ids) for r in pairs} == {settings.probe_prompt_tokens}
    assert build_requests(BUILT_IN["chat"], settings, tokenizer).load_at(0.25) == fast


def test_every_rate_gets_the_same_conversations_in_words_no_other_run_has_sent():
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model(None)))
    settings = ServeBenchSettings(requests_per_rate=12, calibration_requests=4, seed=3)
    requests = build_requests(conversations.BUILT_IN["multi-turn"], settings, tokenizer)
    slow, fast = requests.conversations_at(0.125), requests.conversations_at(0.25)
    assert [[len(m) for m in c.messages] for c in slow] == [[len(m) for m in c.messages] for c in fast]
    assert requests.load_lengths == [(len(c.messages[0]), c.answer_tokens[0]) for c in slow]
    firsts = [c.messages[0][:16] for c in [*slow, *fast]]
    assert len(set(firsts)) == len(firsts)
    assert requests.turns_per_arrival() == sum(len(c.messages) for c in slow) / 12


def test_every_setting_is_searched_on_runs_measured_once_and_judged_from_the_same_requests(monkeypatch):
    """At rate r every request has TTFT 100 x r ms and TPOT 10 ms (a fake service): goodput is 10 req/s
    where TTFT may be 1000 ms, and the looser settings find every rate they probe already run."""
    served: list[float] = []

    async def load(url, model, specs, timeout_s, progress=None):
        rate = 1.0 / specs[1].arrival_s  # the unit-rate trace below has its second request at 1 s
        served.append(rate)
        return [_result(100.0 * rate, 10.0) for _ in specs]

    async def calibrate(*args, **kwargs):
        unloaded = [_result(50.0, 10.0) for _ in range(4)]
        return {"ttft_ms": {"p50": 50.0, "p90": 50.0}, "tpot_ms": {"p50": 10.0, "p90": 10.0}}, unloaded

    monkeypatch.setattr(serve_bench, "run_load", load)
    monkeypatch.setattr(engine_probe, "calibrate", calibrate)
    lengths = [(4, 4)] * 4
    vocab = list(range(100, 200))
    requests = serve_bench.Requests(lengths, [0.0, 1.0, 2.0, 3.0], vocab, 0, make_requests(lengths, vocab, 1), [],
                                    make_requests(lengths[:1], vocab, 2)[0])
    settings = ServeBenchSettings(requests_per_rate=4, start_rps=1.0, max_runs=8, ttft_scales=[20, 2000],
                                  tpot_scales=[0.5, 2],
                                  objectives_ms=[{"name": "interactive", "ttft_ms": 1000, "tpot_ms": 20}])
    section, _ = serve_bench.measure(Target("service", "http://fake", "m", None), requests, settings, None, None)

    goodput = section["goodput"]
    assert list(goodput) == ["ttft20x/tpot0.5x", "ttft20x/tpot2x", "ttft2000x/tpot0.5x", "ttft2000x/tpot2x",
                             "interactive"]
    for missed in ("ttft20x/tpot0.5x", "ttft2000x/tpot0.5x"):  # TPOT 5 ms: missed even unloaded, so no runs
        assert goodput[missed] == {"goodput_rps": 0.0, "upper_rps": None, "probes": [], "unloaded_attainment": 0.0}
    assert goodput["ttft20x/tpot2x"]["goodput_rps"] == goodput["interactive"]["goodput_rps"]  # both TTFT 1000 ms
    assert 10.0 / 1.2 <= goodput["interactive"]["goodput_rps"] <= 10.0 < goodput["interactive"]["upper_rps"]
    assert goodput["ttft2000x/tpot2x"]["goodput_rps"] == 16.0  # the search's ceiling: every rate passed
    assert len(served) == len(set(served)) == len(section["runs"])  # a rate is run once, whichever setting asks
    probed = {round(p["rate_rps"], 6) for g in goodput.values() for p in g["probes"]}  # as the runner keys them
    assert probed == {r["rate_rps"] for r in section["runs"]}
    for run in section["runs"]:
        met = run["rate_rps"] * 100.0 <= 1000.0
        assert run["attainment"] == {"ttft20x/tpot0.5x": 0.0, "ttft20x/tpot2x": float(met),
                                     "ttft2000x/tpot0.5x": 0.0, "ttft2000x/tpot2x": 1.0, "interactive": float(met)}
