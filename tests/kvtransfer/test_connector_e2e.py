"""A decode vLLM engine fed KV by a prefill vLLM engine in another process, over
pdserve's gRPC transfer layer, against one plain engine (float32, greedy)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import grpc
import pytest

from pdserve.bench.engine_process import DisaggregatedPair, EngineProcess, EngineSpec
from pdserve.config.kvtransfer import KVTransferSettings
from pdserve.kvtransfer import params
from pdserve.kvtransfer.fingerprint import KVFingerprint
from pdserve.kvtransfer.sender import KVSender
from pdserve.model_store import resolve_model
from pdserve.ports import free_port
from tests.kvtransfer.fake_corrupting_proxy import FakeCorruptingProxy

pytestmark = pytest.mark.slow

SECRET = "e2e-cluster-secret"
LENGTHS = [1, 42, 127, 128, 129, 1000]
MAX_TOKENS = 16
TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based inks and a wooden screw press into a system that could "
    "produce books faster than any scribe. Within decades, presses spread across Europe, prices of "
    "books fell, literacy rose, and ideas travelled further than ever before. "
)


@pytest.fixture(scope="module")
def model_dir() -> str:
    return str(resolve_model(None))


# Forged KV (noise with a valid checksum) is believed by the decode engine and
# enters its prefix cache, so that test gets a prompt no other test shares; so does
# the kill test, whose whole prompt must travel (no prefix-cache hit).
FORGED_TEXT = "Bees communicate the direction of flowers to their hive mates by dancing. " * 3


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def prompts(tokenizer) -> dict:
    ids = tokenizer(TEXT * 40)["input_ids"]
    assert len(ids) > max(LENGTHS)
    doomed = tokenizer(" ".join(reversed(TEXT.split())) * 40)["input_ids"][:1000]
    chunked = tokenizer(" ".join(TEXT.split()[::2]) * 40)["input_ids"][:700]
    # Three 600-token prompts sharing no block with any other: 4 whole blocks and a partial one each.
    held, lacking, moved = (tokenizer(" ".join(TEXT.split()[k::k + 1]) * 60)["input_ids"][:600] for k in (1, 2, 4))
    return {**{n: ids[:n] for n in LENGTHS}, "forged": tokenizer(FORGED_TEXT)["input_ids"], "doomed": doomed,
            "open": tokenizer(OPEN_TEXT)["input_ids"], "chunked": chunked, "held": held, "lacking": lacking,
            "moved": moved}


SEEDED = {"temperature": 1.0, "seed": 1234}
IDEA_SCHEMA = {"type": "object", "properties": {"idea": {"type": "string"}, "cost": {"type": "integer"}},
               "required": ["idea", "cost"]}
SEEDED_JSON = {**SEEDED, "structured_outputs": {"json_schema": IDEA_SCHEMA}}
"""Seeded, and held to a JSON schema: the grammar's state must go on where the answer does."""
OPEN_TEXT = "Here are some unusual ideas for a rainy weekend at home with friends:"
"""An open-ended prompt, where sampled answers spread (the repeated TEXT is continued near-certainly)."""


@pytest.fixture(scope="module")
def reference(model_dir, prompts) -> dict[int | str, list[int]]:
    """Greedy output of one plain engine, computed before the P/D engines start; and its seeded
    sampled answers to the open-ended prompt, free (`seeded-open`) and JSON (`json-open`), and its
    greedy JSON answer to it (`greedy-json-open`)."""
    plain = EngineProcess(EngineSpec(model_dir, "plain", cpu_bind="0-1"))
    try:
        out = {k: plain.generate({"prompt_token_ids": ids, "max_tokens": MAX_TOKENS})["token_ids"]
               for k, ids in prompts.items()}
        out["seeded-open"] = plain.generate({"prompt_token_ids": prompts["open"], "max_tokens": MAX_TOKENS,
                                             **SEEDED})["token_ids"]
        out["json-open"] = plain.generate({"prompt_token_ids": prompts["open"], "max_tokens": MAX_TOKENS,
                                           **SEEDED_JSON})["token_ids"]
        out["greedy-json-open"] = plain.generate({"prompt_token_ids": prompts["open"], "max_tokens": MAX_TOKENS,
                                                  "structured_outputs": SEEDED_JSON["structured_outputs"]})["token_ids"]
        return out
    finally:
        plain.stop()


class PD(DisaggregatedPair):
    """The pair, plus what the tests vary: another prefill engine, the push's destination."""

    def __init__(self, model_dir: str):
        super().__init__(model_dir, SECRET)

    def new_prefill(self) -> EngineProcess:
        return EngineProcess(EngineSpec(self.model, "prefill", {"secret": self.secret}, cpu_bind="0"))

    def run(self, ids, dest=None, skip_tokens: int = 0):
        """Like generate, but returns both results, can push through another address, and can leave
        out the `skip_tokens` the decode engine is expected to hold."""
        tid = uuid.uuid4().hex
        self.decode.send_generate({"prompt_token_ids": ids, "max_tokens": MAX_TOKENS,
                                   "kv_transfer_params": params.for_decode(tid, skip_tokens=skip_tokens)})
        pr = self.prefill.generate({"prompt_token_ids": ids, "max_tokens": 1, "kv_transfer_params":
                                    params.for_prefill(tid, dest or self.addr, skip_tokens=skip_tokens)})
        return pr, self.decode.result()


@pytest.fixture(scope="module")
def pd(model_dir, reference):
    pair = PD(model_dir)
    yield pair
    pair.stop()


def _report(result) -> dict:
    return result["kv_transfer_params"][params.KEY]


def _assert_no_leak(pd: PD) -> None:
    assert pd.decode.call("free_blocks") == pd.decode.idle_free_blocks
    assert pd.prefill.call("free_blocks") == pd.prefill.idle_free_blocks
    rx = pd.decode.call("connector")["receiver"]
    assert (rx["active"], rx["reserved_bytes"], rx["staged_bytes"]) == (0, 0, 0), rx


@pytest.mark.parametrize("n", LENGTHS)
def test_decode_fed_by_prefill_is_token_identical_to_plain_engine(pd, prompts, reference, n):
    pr, dr = pd.run(prompts[n])
    rep = _report(dr)
    print(f"n={n}: {rep}")
    assert rep["state"] == "DONE", rep
    assert dr["token_ids"] == reference[n]
    assert pr["token_ids"][0] == reference[n][0]  # prefill's own first token agrees too
    # Not recomputed: the connector loaded every prompt token, and the engine's own
    # counter shows them as cached (vLLM always recomputes the last one for logits).
    assert rep["tokens"] == n
    assert dr["num_cached_tokens"] >= n - 1


@pytest.mark.parametrize("n, sampling, expected", [(42, {}, 42), (129, {}, 129), ("open", SEEDED, "seeded-open"),
                                                   ("open", SEEDED_JSON, "json-open")],
                         ids=["42", "129", "open-seeded", "open-seeded-json-schema"])
def test_an_answer_going_on_from_the_prefill_engines_first_token_is_the_plain_engines(pd, prompts, reference, n,
                                                                                      sampling, expected):
    tid = uuid.uuid4().hex
    first = pd.prefill.generate({"prompt_token_ids": prompts[n], "max_tokens": 1, **sampling,
                                 "kv_transfer_params": params.for_prefill(tid, pd.addr)})
    rest = pd.decode.generate({"prompt_token_ids": prompts[n] + first["token_ids"], "max_tokens": MAX_TOKENS - 1,
                               **sampling, "sampled_tokens": 1,
                               "kv_transfer_params": params.for_decode(tid, kv_tokens=len(prompts[n]))})
    rep = _report(rest)
    # The prompt's KV came; the first token, prompt to the decode engine, was computed there.
    assert rep["state"] == "DONE" and rep["tokens"] == len(prompts[n]), rep
    assert first["token_ids"] + rest["token_ids"] == reference[expected]
    _assert_no_leak(pd)


def test_a_prompt_prefilled_in_chunks_that_end_mid_block_arrives_whole(pd, model_dir, prompts, reference):
    """An adaptive engine's prefill shares each step's token budget with its decodes, so its
    chunks end mid-block: each block is pushed once, with the chunk that completes it (the
    receiver refuses a block pushed twice). 264-token chunks end mid-block for any block size
    from 16 to 128."""
    chunked = EngineProcess(EngineSpec(model_dir, "prefill", {"secret": SECRET}, cpu_bind="0",
                                       max_num_batched_tokens=264))
    try:
        tid = uuid.uuid4().hex
        ids = prompts["chunked"]
        pd.decode.send_generate({"prompt_token_ids": ids, "max_tokens": MAX_TOKENS,
                                 "kv_transfer_params": params.for_decode(tid)})
        chunked.generate({"prompt_token_ids": ids, "max_tokens": 1, "kv_transfer_params": params.for_prefill(tid, pd.addr)})
        dr = pd.decode.result()
    finally:
        chunked.stop()
    rep = _report(dr)
    assert rep["state"] == "DONE" and rep["tokens"] == len(ids), rep
    assert dr["token_ids"] == reference["chunked"]
    _assert_no_leak(pd)


def test_kv_pushed_for_an_answer_that_ended_at_its_first_token_is_freed_when_discarded(pd, prompts):
    tid = uuid.uuid4().hex
    pd.prefill.generate({"prompt_token_ids": prompts[129], "max_tokens": 1,
                         "kv_transfer_params": params.for_prefill(tid, pd.addr)})
    deadline = time.monotonic() + 30
    while pd.decode.call("connector")["receiver"]["staged_bytes"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pd.decode.call("connector")["receiver"]["staged_bytes"] > 0  # staged, and no request will load it
    assert pd.decode.call("rpc", {"method": "pdserve_discard_kv_transfer", "args": [tid]}) is True
    _assert_no_leak(pd)


def test_a_seeded_answer_going_on_without_skipping_the_first_draw_differs(pd, prompts, reference):
    """What the skip is for: the decode engine's generator would otherwise draw anew."""
    first = pd.prefill.generate({"prompt_token_ids": prompts["open"], "max_tokens": 1, **SEEDED})
    rest = pd.decode.generate({"prompt_token_ids": prompts["open"] + first["token_ids"],
                               "max_tokens": MAX_TOKENS - 1, **SEEDED})
    assert first["token_ids"] == reference["seeded-open"][:1]
    assert first["token_ids"] + rest["token_ids"] != reference["seeded-open"]
    _assert_no_leak(pd)


def test_a_json_answer_going_on_without_its_grammar_moved_on_differs(pd, prompts, reference, tokenizer):
    """What the grammar carry is for: a fresh grammar on the decode engine starts the JSON over."""
    json_only = {"structured_outputs": SEEDED_JSON["structured_outputs"]}
    first = pd.prefill.generate({"prompt_token_ids": prompts["open"], "max_tokens": 1, **json_only})
    rest = pd.decode.generate({"prompt_token_ids": prompts["open"] + first["token_ids"],
                               "max_tokens": MAX_TOKENS - 1, **json_only})
    assert first["token_ids"] == reference["greedy-json-open"][:1]
    assert tokenizer.decode(reference["greedy-json-open"]).startswith("{") and first["token_ids"] == [tokenizer.encode("{")[0]]
    assert first["token_ids"] + rest["token_ids"] != reference["greedy-json-open"]
    _assert_no_leak(pd)


def _received_bytes(pd: PD) -> int:
    return pd.decode.call("connector")["receiver"]["bytes"]


def test_a_transfer_leaves_out_the_blocks_the_decode_engine_holds_and_the_answer_is_the_same(pd, prompts, reference):
    # The decode engine computed the first 300 tokens of "held" itself (an earlier turn): blocks 0-1 stay cached.
    pd.decode.generate({"prompt_token_ids": prompts["held"][:300], "max_tokens": 1})
    before = _received_bytes(pd)
    pd.run(prompts["moved"])  # the same length, nothing held: all 5 blocks move
    whole = _received_bytes(pd) - before
    _, dr = pd.run(prompts["held"], skip_tokens=300)
    part = _received_bytes(pd) - before - whole
    rep = _report(dr)
    assert rep["state"] == "DONE", rep
    assert dr["token_ids"] == reference["held"]
    assert part * 5 == whole * 3 and part > 0  # blocks 2-4 only
    assert dr["num_cached_tokens"] >= 599  # 256 from its own cache, the rest loaded
    _assert_no_leak(pd)


def test_a_decode_engine_lacking_what_the_transfer_leaves_out_computes_the_prompt_to_the_same_answer(pd, prompts,
                                                                                                      reference):
    _, dr = pd.run(prompts["lacking"], skip_tokens=300)  # routing believed it held 300 tokens: it holds none
    assert dr["token_ids"] == reference["lacking"]
    assert dr["num_cached_tokens"] == 0 and "state" not in _report(dr)  # computed here, nothing loaded
    _assert_no_leak(pd)


def test_each_side_copies_each_kv_byte_at_most_once(pd):
    sent = pd.prefill.call("connector")["counters"]
    got = pd.decode.call("connector")["counters"]
    print(f"prefill {sent}\ndecode {got}")
    # Each chunk is framed once: the frames hold the payload plus headers of a few dozen bytes.
    assert 0 < sent["sent_bytes"] <= sent["send_copies_bytes"] < 1.01 * sent["sent_bytes"]
    # Blocks the decode engine already had cached are skipped, so it may copy less.
    assert 0 < got["load_copies_bytes"] <= got["received_bytes"]
    # The pair shares a node: after the first transfer (and its handshake) payloads went through
    # shared memory, so the answers checked above came over both paths.
    rx = pd.decode.call("connector")["receiver"]
    assert 0 < rx["same_node"] < rx["done"]


def test_noise_in_flight_fails_the_checksum_and_decode_recomputes(pd, prompts, reference):
    proxy = FakeCorruptingProxy(pd.addr, mode="noise")
    try:
        _, dr = pd.run(prompts[129], dest=proxy.start())
    finally:
        proxy.stop()
    rep = _report(dr)
    assert proxy.corrupted_chunks > 0
    assert rep["state"] == "FAILED" and "checksum mismatch" in rep["error"], rep
    assert rep["tokens"] == 0
    assert dr["token_ids"] == reference[129]  # recomputed, not garbage
    _assert_no_leak(pd)


def test_noise_with_a_valid_checksum_changes_the_output_so_decode_uses_received_kv(pd, prompts, reference):
    proxy = FakeCorruptingProxy(pd.addr, mode="noise_valid_crc")
    try:
        _, dr = pd.run(prompts["forged"], dest=proxy.start())
    finally:
        proxy.stop()
    assert _report(dr)["state"] == "DONE"
    assert dr["token_ids"] != reference["forged"]
    _assert_no_leak(pd)


def _fingerprint(pd: PD, **changes) -> KVFingerprint:
    fp = dict(pd.decode.call("connector")["fingerprint"])
    fp.update(changes)
    return KVFingerprint(**fp)


def test_peer_without_the_secret_is_refused_before_any_payload(pd):
    before = pd.decode.call("connector")["receiver"]
    for secret in ("", "wrong-secret"):
        sender = KVSender(KVTransferSettings(secret=secret), _fingerprint(pd))
        try:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                sender.handshake(pd.addr)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            t = sender.open(uuid.uuid4().hex, pd.addr, num_tokens=200, lease_ms=5_000)
            t.send_chunk(0, 0, 1, [memoryview(bytes(_fingerprint(pd).block_bytes_per_layer))])
            t.finish()
            res = t.result.result(timeout=30)
            assert res.state.name == "FAILED" and "UNAUTHENTICATED" in res.error
        finally:
            sender.close()
    after = pd.decode.call("connector")["receiver"]
    assert (after["opened"], after["chunks"]) == (before["opened"], before["chunks"])


@pytest.mark.parametrize("change", [{"block_size": 64}, {"dtype": "bfloat16"}])
def test_peer_with_a_different_block_size_or_dtype_is_refused_naming_the_field(pd, change):
    sender = KVSender(KVTransferSettings(secret=SECRET), _fingerprint(pd, **change))
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            sender.handshake(pd.addr)
    finally:
        sender.close()
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    (field,) = change
    assert f"{field}:" in err.value.details()


def test_with_the_fail_policy_a_lost_transfer_ends_the_request_with_an_error_not_garbage(model_dir, prompts, pd):
    strict = EngineProcess(
        EngineSpec(model_dir, "decode", {"secret": SECRET, "listen_addr": f"127.0.0.1:{free_port()}"},
                   cpu_bind="1", kv_load_failure_policy="fail")
    )
    try:
        # No prefill ever pushes this transfer: its lease runs out.
        dr = strict.generate({"prompt_token_ids": prompts[129], "max_tokens": MAX_TOKENS,
                              "kv_transfer_params": params.for_decode(uuid.uuid4().hex, 1_000)})
        assert (dr["finish_reason"], dr["token_ids"]) == ("error", [])
        assert strict.call("free_blocks") == strict.idle_free_blocks
    finally:
        strict.stop()


def test_prefill_killed_mid_transfer_decode_recovers_within_the_lease(pd, prompts, reference):
    doomed = pd.new_prefill()
    try:
        _kill_prefill_mid_transfer(pd, doomed, prompts, reference)
    finally:
        doomed.stop()


def _kill_prefill_mid_transfer(pd: PD, doomed: EngineProcess, prompts, reference) -> None:
    lease_ms = 5_000
    n = "doomed"
    tid = uuid.uuid4().hex
    chunks_before = pd.decode.call("connector")["receiver"]["chunks"]
    pd.decode.send_generate(
        {"prompt_token_ids": prompts[n], "max_tokens": MAX_TOKENS, "kv_transfer_params": params.for_decode(tid, lease_ms)}
    )
    doomed.send_generate(
        {"prompt_token_ids": prompts[n], "max_tokens": 1, "kv_transfer_params": params.for_prefill(tid, pd.addr, lease_ms)}
    )
    deadline = time.monotonic() + 120
    while pd.decode.call("connector")["receiver"]["chunks"] == chunks_before:  # wait until KV is in flight
        assert time.monotonic() < deadline, "the doomed prefill never started pushing"
        time.sleep(0.02)
    killed_at = time.monotonic()
    doomed.kill()
    dr = pd.decode.result(timeout_s=300)
    waited_s = time.monotonic() - killed_at
    rep = _report(dr)
    print(f"decode ended {waited_s:.1f} s after the kill: {rep}")
    assert rep["state"] == "FAILED" and "lease expired" in rep["error"], rep
    assert dr["token_ids"] == reference[n]
    rx = pd.decode.call("connector")["receiver"]
    assert rx["chunks"] > chunks_before  # some of the KV had arrived when the prefill died
    _assert_no_leak(pd)


def _allowed_cores(pid: int) -> set[str]:
    allowed = set()
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        line = next(x for x in status.read_text().splitlines() if x.startswith("Cpus_allowed_list"))
        allowed.add(line.split()[1])
    return allowed


def test_each_engine_of_the_pair_runs_every_thread_on_its_own_core_only(pd):
    # In-process engines get no binding from vLLM: unconfined, a decode engine stepping while it
    # waits for KV would take the prefill engine's core.
    assert _allowed_cores(pd.prefill.proc.pid) == {"0"}
    assert _allowed_cores(pd.decode.proc.pid) == {"1"}
