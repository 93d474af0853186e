"""The prefix index: blocks an engine reports under vLLM's own block hashes, over real token ids,
found by the ingress's hashes of a prompt; tolerant of lost events and bounded in memory."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from transformers import AutoTokenizer
from vllm.utils.hashing import sha256
from vllm.v1.core import kv_cache_utils
from vllm.v1.core.kv_cache_utils import hash_block_tokens, maybe_convert_block_hash

from pdserve.controller.prefix_index import (
    GRAIN_TOKENS,
    CacheEvents,
    Cleared,
    PrefixIndex,
    Removed,
    Stored,
    block_hashes,
)
from pdserve.model_store import resolve_model

BLOCK = 32
"""An engine's KV block size in these tests: two of the index's pieces."""


@pytest.fixture(scope="module")
def tokens() -> list[int]:
    """Real token ids: a system prompt and a question, as the default model's tokenizer has them."""
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model(None)))
    text = ("You are a careful assistant for a travel agency. Answer briefly and name your sources. " * 8 +
            "Which trains run from Paris to Lyon on Sundays, and how long do they take?")
    ids = tokenizer.encode(text)
    assert len(ids) >= 4 * BLOCK
    return ids


def vllm_hashes(token_ids: list[int], block_size: int = BLOCK) -> list:
    """vLLM's own hashes of each full block, as its KV cache events name them."""
    kv_cache_utils.init_none_hash(sha256)
    hashes, parent = [], None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block_tokens(sha256, parent, token_ids[start:start + block_size])
        hashes.append(parent)
    return [maybe_convert_block_hash(h) for h in hashes]


def held(index: PrefixIndex, prompt_hashes: list[int]) -> dict[int, int]:
    """Instance number -> the prompt's leading tokens it holds."""
    instances, tokens = index.cached_tokens(prompt_hashes)
    return dict(zip(instances.tolist(), tokens.tolist(), strict=True))


def store(index: PrefixIndex, instance: int, token_ids: list[int], first: int, last: int) -> None:
    """`instance` stored blocks first..last-1 of `token_ids`, in one event, as vLLM reports it."""
    hashes = vllm_hashes(token_ids)
    parent = hashes[first - 1] if first else None
    index.stored(instance, parent, hashes[first:last], token_ids[first * BLOCK:last * BLOCK], BLOCK)


def test_a_prompt_finds_the_blocks_an_engine_stored_under_vllms_hashes(tokens: list[int]) -> None:
    index = PrefixIndex()
    store(index, 1, tokens, 0, 2)
    store(index, 1, tokens, 2, 3)  # a later event, chained to the first by vLLM's hash of block 1
    assert held(index, block_hashes(tokens)) == {1: 3 * BLOCK}
    longer = tokens + [17, 18, 19]  # the next turn: the same history and more
    assert held(index, block_hashes(longer)) == {1: 3 * BLOCK}
    other = tokens[:BLOCK] + [t + 1 for t in tokens[BLOCK:]]  # the same first block, then different
    assert held(index, block_hashes(other)) == {1: BLOCK}
    assert held(index, block_hashes(tokens[GRAIN_TOKENS:])) == {}  # the same tokens elsewhere: no prefix


def test_each_instance_counts_its_own_longest_prefix(tokens: list[int]) -> None:
    index = PrefixIndex()
    store(index, 1, tokens, 0, 1)
    store(index, 2, tokens, 0, 4)
    assert held(index, block_hashes(tokens)) == {1: BLOCK, 2: 4 * BLOCK}


def test_evicted_blocks_shorten_the_prefix_as_vllm_evicts_them_last_first(tokens: list[int]) -> None:
    index = PrefixIndex()
    store(index, 1, tokens, 0, 4)
    store(index, 2, tokens, 0, 4)
    index.removed(1, vllm_hashes(tokens)[3:0:-1])
    assert held(index, block_hashes(tokens)) == {1: BLOCK, 2: 4 * BLOCK}
    assert index.size(1) == BLOCK


def test_blocks_whose_parent_event_was_lost_are_left_out(tokens: list[int]) -> None:
    index = PrefixIndex()
    store(index, 1, tokens, 2, 4)  # their parent, block 1, was never reported
    assert index.size(1) == 0 and held(index, block_hashes(tokens)) == {}


def test_lost_events_or_a_cleared_cache_forget_the_instance(tokens: list[int]) -> None:
    index = PrefixIndex()
    store(index, 1, tokens, 0, 2)
    store(index, 2, tokens, 0, 2)
    index.apply(1, CacheEvents((), lost=True))
    index.apply(2, CacheEvents((Cleared(),)))
    assert held(index, block_hashes(tokens)) == {}
    hashes = vllm_hashes(tokens)
    index.apply(1, CacheEvents((Stored(None, tuple(hashes[:2]), tuple(tokens[:2 * BLOCK]), BLOCK),
                                  Removed((hashes[1],)))))
    assert held(index, block_hashes(tokens)) == {1: BLOCK}


def test_an_instance_holds_at_most_its_bound_dropping_its_oldest_blocks(tokens: list[int]) -> None:
    index = PrefixIndex(max_pieces_per_instance=4 * BLOCK // GRAIN_TOKENS)
    store(index, 1, tokens, 0, 2)
    other = [t + 7 for t in tokens]
    store(index, 1, other, 0, 3)
    assert index.size(1) == 4 * BLOCK
    assert held(index, block_hashes(other)) == {1: 3 * BLOCK}
    assert held(index, block_hashes(tokens)) == {}  # block 0 went first, so no prefix is left


def test_a_block_size_that_is_not_whole_pieces_is_not_indexed(tokens: list[int]) -> None:
    index = PrefixIndex()
    odd = GRAIN_TOKENS + 8
    index.stored(1, None, vllm_hashes(tokens, odd)[:2], tokens[:2 * odd], odd)
    assert index.size(1) == 0


def test_the_ingress_hashes_only_whole_pieces_and_the_same_in_every_process() -> None:
    assert block_hashes(list(range(GRAIN_TOKENS - 1))) == []
    assert len(block_hashes(list(range(3 * GRAIN_TOKENS + 5)))) == 3
    code = "from pdserve.controller.prefix_index import block_hashes; print(block_hashes(list(range(40))))"
    for seed in ("1", "2"):  # the ingress and the controller run in processes salted differently
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed},
                             capture_output=True, text=True, check=True).stdout
        assert out.strip() == str(block_hashes(list(range(40))))


def test_a_piece_two_instances_hold_stays_found_for_one_when_the_other_drops_it(tokens: list[int]) -> None:
    index = PrefixIndex()
    store(index, 1, tokens, 0, 2)
    store(index, 2, tokens, 0, 2)
    store(index, 3, tokens, 0, 2)
    index.forget(2)
    assert held(index, block_hashes(tokens)) == {1: 2 * BLOCK, 3: 2 * BLOCK}
    index.removed(3, vllm_hashes(tokens)[1::-1])
    assert held(index, block_hashes(tokens)) == {1: 2 * BLOCK}
    index.forget(1)
    assert held(index, block_hashes(tokens)) == {} and index._holders == {}  # nothing left behind


def test_a_piece_a_thousand_instances_share_takes_bytes_and_each_finds_its_own_length(tokens: list[int]) -> None:
    index = PrefixIndex()
    for i in range(1000):
        store(index, i, tokens, 0, 1 + i % 4)
    assert held(index, block_hashes(tokens)) == {i: (1 + i % 4) * BLOCK for i in range(1000)}
    assert sys.getsizeof(index._holders[block_hashes(tokens)[0]]) < 200  # a bitmap: a set of them took 32 KiB
    for i in range(1, 1000):
        index.forget(i)
    assert held(index, block_hashes(tokens)) == {0: BLOCK}
    assert all(holders == ~0 for holders in index._holders.values())  # one holder again: no bitmap kept
