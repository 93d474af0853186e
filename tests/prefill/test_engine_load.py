from types import SimpleNamespace

from pdserve.controller.instance import LoadReport
from pdserve.prefill.engine_load import EngineLoad

BASE = LoadReport("r1", "decode", "node", None, "a:1", 8, 1.0)


def _fake_vllm_config(num_gpu_blocks: int = 100, block_size: int = 16) -> SimpleNamespace:
    return SimpleNamespace(cache_config=SimpleNamespace(num_gpu_blocks=num_gpu_blocks, block_size=block_size))


def test_a_request_counts_its_prompt_until_its_first_token_and_its_context_until_it_ends():
    load = EngineLoad()
    with load.track(100, prefills=True) as progress:
        r = load.report(BASE)
        assert (r.running, r.queued_prefill_tokens, r.context_tokens) == (1, 100, 100)
        progress.output(1)
        progress.output(2)
        r = load.report(BASE)
        assert (r.queued_prefill_tokens, r.context_tokens) == (0, 103)
    r = load.report(BASE)
    assert (r.running, r.queued_prefill_tokens, r.context_tokens) == (0, 0, 0)
    assert r.recent_ttft_ms > 0 and r.recent_tpot_ms >= 0


def test_a_kv_load_queues_no_prefill_and_a_failed_request_gives_its_prompt_back():
    load = EngineLoad()
    with load.track(50, prefills=False):
        assert load.report(BASE).queued_prefill_tokens == 0
    try:
        with load.track(70, prefills=True):
            raise RuntimeError("engine died")
    except RuntimeError:
        pass
    assert load.report(BASE).queued_prefill_tokens == 0 and load.report(BASE).running == 0


def test_free_kv_blocks_come_from_the_engines_scheduler_statistics():
    load = EngineLoad()
    stats = load.stat_logger(_fake_vllm_config(num_gpu_blocks=200, block_size=32), 0)
    stats.record(SimpleNamespace(num_waiting_reqs=3, kv_cache_usage=0.25), None)
    r = load.report(BASE)
    assert (r.waiting, r.free_kv_blocks, r.total_kv_blocks, r.block_size) == (3, 150, 200, 32)
