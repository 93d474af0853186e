"""The added-latency probe sets each answer against the engine that gave its first token."""

from pdserve.bench.engine_probe import EngineTarget, _added, first_token_engine
from pdserve.bench.loadgen import RequestResult

DECODE = EngineTarget("app", "decode", "d1", 1000)
PREFILL = EngineTarget("app", "prefill", "p1", 1000)


def _answer(ttft_ms: float, ingress_ttft_ms: float, moved: bool) -> RequestResult:
    return RequestResult("calibration", "ok", 200, ttft_ms, None, ttft_ms, 2, None, {"ttft_ms": ingress_ttft_ms},
                         kv_transfer={"state": "DONE", "bytes": 1} if moved else None)


def test_a_moved_answer_is_set_against_the_prefill_engine_and_a_local_one_against_the_decode_engine():
    engines = [DECODE, PREFILL]
    assert first_token_engine(_answer(100, 95, moved=True), engines) == 1
    assert first_token_engine(_answer(100, 95, moved=False), engines) == 0


def test_with_one_engine_every_answer_is_set_against_it():
    adaptive = EngineTarget("app", "adaptive", "a1", 1000)
    assert first_token_engine(_answer(100, 95, moved=True), [adaptive]) == 0


def test_added_latency_subtracts_each_probes_own_first_token_engine():
    # Probe 0 was prefilled remotely (its first token is the prefill engine's, 100 ms there, 80 ms
    # on the decode engine); probe 1 locally (decode engine 90 ms).
    served = [_answer(110, 104, moved=True), _answer(96, 92, moved=False)]
    direct = [[80.0, 90.0], [100.0, 120.0]]  # per engine (decode, prefill), per probe
    out = _added(served, direct, [DECODE, PREFILL])
    assert out["first_token_from"] == {"decode replica d1": 1, "prefill replica p1": 1}
    assert out["engine_ttft_ms"]["p50"] == 95.0  # 100 (prefill, probe 0) and 90 (decode, probe 1)
    assert out["added_ms"]["mean"] == 8.0  # (110 - 100 + 96 - 90) / 2
    assert out["ingress_ms"]["p50"] == 3.0  # (104 - 100 + 92 - 90) / 2
