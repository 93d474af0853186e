"""What `pdserve bench serve` sends: the same lengths and arrivals at every rate, fresh prompt
contents per rate (so no run is prefilled from an earlier run's prefix cache); and how it searches
every objective setting on one set of runs, or, sending each setting's objectives, on runs of its own."""

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
    # Runs that carry a setting's objectives are one per setting at a rate: each sends prompts of its own.
    settings_at_slow = [requests.load_at(0.125, setting) for setting in (1, 2)]
    for other in settings_at_slow:
        assert [(len(r.prompt_token_ids), r.output_tokens) for r in other] == requests.load_lengths
        assert not {tuple(r.prompt_token_ids[:16]) for r in other} & set(first_blocks)
    assert not {tuple(r.prompt_token_ids[:16]) for r in settings_at_slow[0]} & {
        tuple(r.prompt_token_ids[:16]) for r in settings_at_slow[1]}


def test_every_rate_gets_the_same_conversations_in_words_no_other_run_has_sent():
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model(None)))
    settings = ServeBenchSettings(requests_per_rate=12, calibration_requests=4, seed=3)
    requests = build_requests(conversations.BUILT_IN["multi-turn"], settings, tokenizer)
    slow, fast = requests.conversations_at(0.125), requests.conversations_at(0.25)
    assert [[len(m) for m in c.messages] for c in slow] == [[len(m) for m in c.messages] for c in fast]
    other = requests.conversations_at(0.125, 1)  # the runs of one setting that sends its objectives
    assert [[len(m) for m in c.messages] for c in slow] == [[len(m) for m in c.messages] for c in other]
    assert requests.load_lengths == [(len(c.messages[0]), c.answer_tokens[0]) for c in slow]
    firsts = [c.messages[0][:16] for c in [*slow, *fast, *other]]
    assert len(set(firsts)) == len(firsts)
    assert requests.turns_per_arrival() == sum(len(c.messages) for c in slow) / 12


def _requests() -> serve_bench.Requests:
    lengths = [(4, 4)] * 4
    vocab = list(range(100, 200))
    return serve_bench.Requests(lengths, [0.0, 1.0, 2.0, 3.0], vocab, 0, make_requests(lengths, vocab, 1), [],
                                make_requests(lengths[:1], vocab, 2)[0])


async def _calibrate(*args, **kwargs):
    unloaded = [_result(50.0, 10.0) for _ in range(4)]
    return {"ttft_ms": {"p50": 50.0, "p90": 50.0}, "tpot_ms": {"p50": 10.0, "p90": 10.0}}, unloaded


def test_every_setting_is_searched_on_runs_measured_once_and_judged_from_the_same_requests(monkeypatch):
    """At rate r every request has TTFT 100 x r ms and TPOT 10 ms (a fake service): goodput is 10 req/s
    where TTFT may be 1000 ms, and the looser settings find every rate they probe already run."""
    served: list[float] = []

    async def load(url, model, specs, timeout_s, progress=None):
        rate = 1.0 / specs[1].arrival_s  # the unit-rate trace below has its second request at 1 s
        served.append(rate)
        assert all(s.ttft_ms is None and s.tpot_ms is None for s in specs)  # the service's defaults route them
        return [_result(100.0 * rate, 10.0) for _ in specs]

    monkeypatch.setattr(serve_bench, "run_load", load)
    monkeypatch.setattr(engine_probe, "calibrate", _calibrate)
    requests = _requests()
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
    assert all(run["objectives_sent"] is None for run in section["runs"])


class FakeTradingService:
    """At rate r, a request whose TPOT objective is at most 15 ms gets TPOT 10 ms and TTFT 200 x r ms
    (its prompt waits for a core without answers decoding); any other, TPOT 30 ms and TTFT 100 x r ms."""

    def __init__(self):
        self.runs: list[tuple[float, list]] = []

    async def load(self, url, model, specs, timeout_s, progress=None):
        rate = 1.0 / specs[1].arrival_s  # the unit-rate trace has its second request at 1 s
        self.runs.append((rate, specs))
        return [_result(200.0 * rate, 10.0) if s.tpot_ms is not None and s.tpot_ms <= 15 else _result(100.0 * rate, 30.0)
                for s in specs]


TIGHT = {"name": "tight", "ttft_ms": 1000, "tpot_ms": 15}
LOOSE = {"name": "loose", "ttft_ms": 1000, "tpot_ms": 40}


def test_sent_objectives_give_every_setting_runs_of_its_own_judged_at_it_alone(monkeypatch):
    service = FakeTradingService()
    monkeypatch.setattr(serve_bench, "run_load", service.load)
    monkeypatch.setattr(engine_probe, "calibrate", _calibrate)
    settings = ServeBenchSettings(requests_per_rate=4, start_rps=1.0, max_runs=8, objectives_ms=[TIGHT, LOOSE],
                                  send_objectives=True)
    section, _ = serve_bench.measure(Target("service", "http://fake", "m", None), _requests(), settings, None, None)

    goodput = section["goodput"]
    assert 5.0 / 1.2 <= goodput["tight"]["goodput_rps"] <= 5.0 < goodput["tight"]["upper_rps"]  # TTFT 200 x r
    assert 10.0 / 1.2 <= goodput["loose"]["goodput_rps"] <= 10.0 < goodput["loose"]["upper_rps"]  # TTFT 100 x r
    for key in ("tight", "loose"):
        runs = [run for run in section["runs"] if run["objectives_sent"] == key]
        assert 0 < len(runs) <= settings.max_runs  # the budget is per setting
        assert all(list(run["attainment"]) == [key] for run in runs)
        assert {round(p["rate_rps"], 6) for p in goodput[key]["probes"]} == {run["rate_rps"] for run in runs}
    assert len(service.runs) == len(section["runs"])
    sent = {(round(rate, 6), s.ttft_ms, s.tpot_ms) for rate, specs in service.runs for s in specs}
    assert {(run["rate_rps"], *{"tight": (1000, 15), "loose": (1000, 40)}[run["objectives_sent"]])
            for run in section["runs"]} == sent
    assert section["runs"] == sorted(section["runs"], key=lambda r: (r["rate_rps"], r["objectives_sent"] == "loose"))
    prompts = [{tuple(s.prompt) for s in specs} for _, specs in service.runs]
    assert sum(map(len, prompts)) == len(set().union(*prompts))  # no run repeats a prompt of another


def test_fixed_rates_run_once_per_setting_when_objectives_are_sent(monkeypatch):
    service = FakeTradingService()
    monkeypatch.setattr(serve_bench, "run_load", service.load)
    monkeypatch.setattr(engine_probe, "calibrate", _calibrate)
    settings = ServeBenchSettings(requests_per_rate=4, rates_rps=[2.0, 8.0], objectives_ms=[TIGHT, LOOSE],
                                  send_objectives=True)
    section, _ = serve_bench.measure(Target("service", "http://fake", "m", None), _requests(), settings, None, None)

    assert [(r["rate_rps"], r["objectives_sent"], r["attainment"]) for r in section["runs"]] == [
        (2.0, "tight", {"tight": 1.0}), (2.0, "loose", {"loose": 1.0}),
        (8.0, "tight", {"tight": 0.0}), (8.0, "loose", {"loose": 1.0})]
    assert section["goodput"]["tight"] == {"goodput_rps": 2.0, "upper_rps": 8.0, "probes": [
        {"rate_rps": 2.0, "attainment": 1.0}, {"rate_rps": 8.0, "attainment": 0.0}]}
    assert section["goodput"]["loose"]["goodput_rps"] == 8.0
