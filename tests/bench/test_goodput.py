"""The goodput search against latency traces whose goodput is known in closed form."""

import math

import numpy as np
import pytest

from pdserve.bench.goodput import attainment, search_goodput
from pdserve.bench.loadgen import RequestResult


def _result(ttft_ms: float | None, tpot_ms: float | None, outcome: str = "ok") -> RequestResult:
    return RequestResult("load", outcome, 200 if outcome == "ok" else 429, ttft_ms, tpot_ms, 0.0, 8, None, None)


class QueueTrace:
    """A synthetic service: request i's TTFT is base_ms * m_i / (1 - rate / capacity) (queueing
    delay growing as the rate nears capacity), its TPOT the same way from tpot_base_ms. With the
    90th-percentile multiplier m90, attainment reaches 0.9 exactly up to
    rate* = capacity * (1 - base_ms * m90 / objective), the smaller of the TTFT and TPOT bounds."""

    def __init__(self, n: int = 200, capacity_rps: float = 8.0, seed: int = 3):
        rng = np.random.default_rng(seed)
        self.m = rng.lognormal(0.0, 0.4, n)
        self.capacity_rps = capacity_rps
        self.calls: list[float] = []

    def results(self, rate_rps: float, base_ms: float, tpot_base_ms: float) -> list[RequestResult]:
        if rate_rps >= self.capacity_rps:
            return [_result(None, None, "error") for _ in self.m]
        slow = 1.0 / (1.0 - rate_rps / self.capacity_rps)
        return [_result(base_ms * m * slow, tpot_base_ms * m * slow) for m in self.m]

    def known_goodput(self, base_ms: float, ttft_ms: float, tpot_base_ms: float, tpot_ms: float) -> float:
        k = math.ceil(0.9 * len(self.m)) - 1  # the multiplier the 90% must stay under
        m90 = np.sort(self.m)[k]
        return self.capacity_rps * min(1 - base_ms * m90 / ttft_ms, 1 - tpot_base_ms * m90 / tpot_ms)


@pytest.mark.parametrize("ttft_ms, tpot_ms, start_rps", [(400.0, 80.0, 1.0), (250.0, 200.0, 6.0), (1000.0, 45.0, 0.3)])
def test_search_finds_the_known_goodput_within_tolerance(ttft_ms, tpot_ms, start_rps):
    trace = QueueTrace()
    expected = trace.known_goodput(100.0, ttft_ms, 20.0, tpot_ms)

    def attained(rate: float) -> float:
        trace.calls.append(rate)
        return attainment(trace.results(rate, 100.0, 20.0), ttft_ms, tpot_ms)

    found = search_goodput(attained, start_rps, rel_tol=0.05, max_probes=20)
    assert expected / 1.05 <= found.goodput_rps <= expected
    assert found.upper_rps is not None and found.upper_rps > expected
    assert found.upper_rps / found.goodput_rps <= 1.05
    assert [p.rate_rps for p in found.probes] == trace.calls


def test_attainment_counts_rejections_and_errors_against_the_service():
    results = [_result(100, 10), _result(300, 10), _result(100, 50), _result(None, None, "rejected"),
               _result(None, None, "error"), _result(100, None)]  # the last: a one-token answer
    assert attainment(results, 200, 20) == pytest.approx(2 / 6)
    with pytest.raises(ValueError):
        attainment([], 200, 20)


def test_no_rate_passing_gives_zero_after_searching_down_to_the_floor():
    found = search_goodput(lambda rate: 0.5, 1.0, min_rps=0.25)
    assert found.goodput_rps == 0.0
    assert [p.rate_rps for p in found.probes] == [1.0, 0.5, 0.25]
    assert found.upper_rps == 0.25


def test_every_rate_passing_stops_at_the_ceiling_without_an_upper_bound():
    found = search_goodput(lambda rate: 1.0, 1.0, max_rps=5.0)
    assert found.goodput_rps == 5.0 and found.upper_rps is None
    assert [p.rate_rps for p in found.probes] == [1.0, 2.0, 4.0, 5.0]


def test_exactly_the_target_passes():
    found = search_goodput(lambda rate: 0.9 if rate <= 2.0 else 0.85, 1.0, rel_tol=0.01, max_probes=3)
    assert found.goodput_rps == 2.0 and found.upper_rps == 4.0


def test_the_search_stops_at_its_probe_budget_and_when_the_caller_cannot_measure():
    found = search_goodput(lambda rate: 1.0 if rate < 3.0 else 0.0, 1.0, rel_tol=0.001, max_probes=4)
    assert len(found.probes) == 4
    assert 2.0 <= found.goodput_rps < 3.0 <= found.upper_rps

    budget = iter([0.95, 0.95])
    found = search_goodput(lambda rate: next(budget, None), 1.0)
    assert [p.rate_rps for p in found.probes] == [1.0, 2.0]
    assert found.goodput_rps == 2.0 and found.upper_rps is None


@pytest.mark.parametrize("kwargs", [{"start_rps": 0}, {"start_rps": 1, "target": 0}, {"start_rps": 1, "rel_tol": 0}])
def test_bad_search_arguments_are_refused(kwargs):
    with pytest.raises(ValueError):
        search_goodput(lambda rate: 1.0, **kwargs)
