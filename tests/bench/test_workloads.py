"""Workload lengths: the built-ins match their stated sources, files load, prompts have exact lengths."""

import json

import numpy as np
import pytest

from pdserve.bench.workloads import (
    BUILT_IN,
    LengthDist,
    RecordedWorkload,
    load_workload,
    make_requests,
    sample_lengths,
    word_token_ids,
)


def test_built_in_workloads_match_the_figures_their_sources_state():
    assert set(BUILT_IN) == {"chat", "summarization", "code", "azure-conversation"}
    rng = np.random.default_rng(0)
    chat = BUILT_IN["chat"]
    assert "161" in chat.source and "338" in chat.source
    assert np.mean(chat.prompt_tokens.sample(rng, 50_000)) == pytest.approx(161, rel=0.05)
    assert np.mean(chat.output_tokens.sample(rng, 50_000)) == pytest.approx(338, rel=0.05)
    code = BUILT_IN["code"]
    assert "1500" in code.source and np.median(code.prompt_tokens.sample(rng, 50_000)) == pytest.approx(1500, rel=0.03)
    summary = BUILT_IN["summarization"]
    assert np.mean(summary.output_tokens.sample(rng, 50_000)) == pytest.approx(56, rel=0.05)
    conversation = BUILT_IN["azure-conversation"]
    assert "1020" in conversation.source and "129" in conversation.source
    assert np.median(conversation.prompt_tokens.sample(rng, 50_000)) == pytest.approx(1020, rel=0.03)
    assert np.median(conversation.output_tokens.sample(rng, 50_000)) == pytest.approx(129, rel=0.03)


def test_sampling_is_repeatable_for_a_seed_and_fits_the_context():
    chat = BUILT_IN["chat"]
    a = sample_lengths(chat, 500, seed=4, max_model_len=512)
    assert a == sample_lengths(chat, 500, seed=4, max_model_len=512)
    assert a != sample_lengths(chat, 500, seed=5, max_model_len=512)
    assert all(p >= 1 and o >= 1 and p + o <= 512 for p, o in a)
    unclipped = sample_lengths(chat, 500, seed=4, max_model_len=100_000)
    # Prompts are cut to make room; the drawn output lengths are kept (up to the context).
    assert [o for _, o in a] == [min(o, 511) for _, o in unclipped]


def test_length_dist_needs_exactly_one_center_and_a_sane_range():
    with pytest.raises(ValueError, match="exactly one"):
        LengthDist(mean=10, median=10)
    with pytest.raises(ValueError, match="exactly one"):
        LengthDist()
    with pytest.raises(ValueError, match="min_tokens"):
        LengthDist(mean=10, min_tokens=20, max_tokens=5)
    assert set(LengthDist(mean=50, sigma=0).sample(np.random.default_rng(0), 10)) == {50}


def test_workload_files_yaml_and_recorded_jsonl(tmp_path):
    spec = tmp_path / "mine.yaml"
    spec.write_text("name: mine\nsource: our logs, May\nprompt_tokens: {median: 300}\noutput_tokens: {mean: 20}\n")
    assert load_workload(str(spec)).prompt_tokens.median == 300
    trace = tmp_path / "trace.jsonl"
    trace.write_text(json.dumps({"prompt_tokens": 812, "output_tokens": 64}) + "\n\n"
                     + json.dumps({"prompt_tokens": 20, "output_tokens": 5}) + "\n")
    recorded = load_workload(str(trace))
    assert isinstance(recorded, RecordedWorkload) and recorded.lengths == ((812, 64), (20, 5))
    assert set(sample_lengths(recorded, 50, seed=0, max_model_len=4096)) == {(812, 64), (20, 5)}


@pytest.mark.parametrize("name, content, words", [
    ("bad.jsonl", '{"prompt_tokens": 5}\n', "bad.jsonl:1"),
    ("zero.jsonl", '{"prompt_tokens": 0, "output_tokens": 3}\n', ">= 1"),
    ("empty.jsonl", "\n", "no requests"),
    ("bad.yaml", "name: x\nsource: y\nprompt_tokens: {mean: -1}\noutput_tokens: {mean: 3}\n", "not a valid workload"),
])
def test_bad_workload_files_say_what_is_wrong(tmp_path, name, content, words):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=words):
        load_workload(str(path))


def test_unknown_workload_names_the_built_ins():
    with pytest.raises(ValueError, match="chat, summarization, code"):
        load_workload("no-such-workload")


def test_prompts_have_exactly_the_drawn_lengths_in_the_real_tokenizer():
    from transformers import AutoTokenizer

    from pdserve.model_store import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model(None)))
    vocab = word_token_ids(tokenizer)
    assert len(vocab) >= 40
    requests = make_requests([(5, 3), (300, 10)], vocab, seed=1)
    assert [len(r.prompt_token_ids) for r in requests] == [5, 300]
    assert [r.output_tokens for r in requests] == [3, 10]
    assert make_requests([(300, 10)], vocab, seed=1)[0] != make_requests([(300, 10)], vocab, seed=2)[0]
    text = tokenizer.decode(requests[1].prompt_token_ids)
    assert len(tokenizer.encode(text, add_special_tokens=False)) == 300  # words, not token fragments
