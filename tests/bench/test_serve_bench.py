"""What `pdserve bench serve` sends: the same lengths and arrivals at every rate, fresh prompt
contents per rate (so no run is prefilled from an earlier run's prefix cache)."""

from transformers import AutoTokenizer

from pdserve.bench.serve_bench import build_requests
from pdserve.bench.serve_settings import ServeBenchSettings
from pdserve.bench.workloads import BUILT_IN
from pdserve.model_store import resolve_model


def test_every_rate_gets_the_same_lengths_with_prompts_no_other_run_has_sent():
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model(None)))
    settings = ServeBenchSettings(requests_per_rate=12, calibration_requests=4, seed=3)
    requests = build_requests(BUILT_IN["chat"], settings, tokenizer)
    slow, fast = requests.load_at(0.125), requests.load_at(0.25)
    assert [(len(r.prompt_token_ids), r.output_tokens) for r in slow] == requests.load_lengths
    assert [(len(r.prompt_token_ids), r.output_tokens) for r in fast] == requests.load_lengths
    assert requests.load_at(0.125) == slow  # the same at a rate, whichever configuration asks
    pairs = [r for pair in requests.pairs for r in pair]
    first_blocks = [tuple(r.prompt_token_ids[:16]) for r in [*slow, *fast, *requests.calibration, *pairs, requests.warmup]]
    assert len(set(first_blocks)) == len(first_blocks)  # no two prompts share a prefix-cache block
    assert {len(r.prompt_token_ids) for r in pairs} == {settings.probe_prompt_tokens}
    assert build_requests(BUILT_IN["chat"], settings, tokenizer).load_at(0.25) == fast
