"""The connector's scheduler side plans loads and pushes from constructed request states."""

from __future__ import annotations

from types import SimpleNamespace

from pdserve.kvtransfer import params
from pdserve.kvtransfer.connector_meta import GrpcWorkerMetadata, TransferReport
from pdserve.kvtransfer.connector_scheduler import SchedulerSide

BS = 128


def _request(req_id: str, n_tokens: int, kv_params, computed: int = 0):
    return SimpleNamespace(request_id=req_id, num_prompt_tokens=n_tokens, kv_transfer_params=kv_params,
                           num_computed_tokens=computed)


def _blocks(ids):
    return SimpleNamespace(get_block_ids=lambda: (list(ids),))


def _side(block_table: dict[str, list[int]] | None = None) -> SchedulerSide:
    side = SchedulerSide(BS)
    side.kv_cache_manager = SimpleNamespace(get_block_ids=lambda rid: (list((block_table or {})[rid]),))
    return side


def test_decode_request_loads_every_prompt_block_including_the_partial_last_one_once():
    side = _side()
    req = _request("r1", 129, params.for_decode("t1", 5_000))
    assert side.get_num_new_matched_tokens(req, 0) == (129, True)
    side.update_state_after_alloc(req, _blocks([7, 3]), 129)
    (job,) = side.build_connector_meta(SimpleNamespace(num_scheduled_tokens={})).loads
    assert (job.transfer_id, job.first_block, job.block_ids, job.num_tokens, job.lease_ms) == ("t1", 0, [7, 3], 129, 5_000)
    assert side.build_connector_meta(SimpleNamespace(num_scheduled_tokens={})).loads == []
    # After a failed load vLLM asks again: the request is recomputed, not loaded twice.
    assert side.get_num_new_matched_tokens(req, 0) == (0, False)


def test_decode_load_skips_blocks_already_in_the_local_prefix_cache():
    side = _side()
    req = _request("r1", 300, params.for_decode("t1"))
    assert side.get_num_new_matched_tokens(req, 256) == (44, True)
    side.update_state_after_alloc(req, _blocks([4, 5, 6]), 44)
    (job,) = side.build_connector_meta(SimpleNamespace(num_scheduled_tokens={})).loads
    assert (job.first_block, job.block_ids) == (2, [6])


def test_a_request_continuing_from_the_prefill_engines_first_token_loads_only_the_prompt_before_it():
    side = _side()
    req = _request("r1", 130, params.for_decode("t1", kv_tokens=129))  # prompt + the first token
    assert side.get_num_new_matched_tokens(req, 0) == (129, True)
    side.update_state_after_alloc(req, _blocks([7, 3]), 129)
    (job,) = side.build_connector_meta(SimpleNamespace(num_scheduled_tokens={})).loads
    assert (job.num_tokens, job.block_ids) == (129, [7, 3])


def test_kv_tokens_beyond_the_prompt_load_nothing_and_cancel_the_transfer():
    side = _side()
    req = _request("r1", 50, params.for_decode("t1", kv_tokens=51))
    assert side.get_num_new_matched_tokens(req, 0) == (0, False)
    side.update_state_after_alloc(req, _blocks([1]), 0)
    meta = side.build_connector_meta(SimpleNamespace(num_scheduled_tokens={}))
    assert meta.loads == [] and list(meta.cancels) == ["t1"]


def test_decode_request_with_the_whole_prompt_cached_cancels_its_transfer():
    side = _side()
    req = _request("r1", 256, params.for_decode("t1"))
    assert side.get_num_new_matched_tokens(req, 256) == (0, False)
    side.update_state_after_alloc(req, _blocks([4, 5]), 0)
    meta = side.build_connector_meta(SimpleNamespace(num_scheduled_tokens={}))
    assert meta.loads == [] and list(meta.cancels) == ["t1"]


def test_decode_request_ending_before_it_was_scheduled_cancels_its_transfer():
    side = _side()
    req = _request("r1", 50, params.for_decode("t1"))
    side.request_finished(req, [])
    assert list(side.build_connector_meta(SimpleNamespace(num_scheduled_tokens={})).cancels) == ["t1"]


def test_a_loaded_decode_request_cancels_nothing_when_it_finishes():
    side = _side()
    req = _request("r1", 50, params.for_decode("t1"))
    side.update_state_after_alloc(req, _blocks([1]), 50)
    side.build_connector_meta(SimpleNamespace(num_scheduled_tokens={}))
    side.update_state_after_alloc(req, _blocks([1]), 0)  # vLLM's second call once the load is done
    side.request_finished(req, [1])
    assert side.build_connector_meta(SimpleNamespace(num_scheduled_tokens={})).cancels == {}


def test_malformed_params_cost_the_request_its_transfer_not_the_engine():
    side = _side()
    req = _request("r1", 50, {params.KEY: {"op": "recv", "transfer_id": "t", "lease_ms": -1}})
    assert side.get_num_new_matched_tokens(req, 0) == (0, False)
    side.update_state_after_alloc(req, _blocks([1]), 0)
    assert side.build_connector_meta(SimpleNamespace(num_scheduled_tokens={})).loads == []
    assert side.request_finished(req, [1]) == (False, None)


def test_prefill_pushes_chunk_by_chunk_from_block_zero_each_block_once_and_marks_the_last_chunk():
    side = _side({"p1": [10, 11, 12, 13]})
    # 200 prompt tokens already in the local prefix cache, the rest in chunks that end mid-block.
    req = _request("p1", 400, params.for_prefill("t9", "10.0.0.2:7500"), computed=200)
    side.update_state_after_alloc(req, _blocks([10, 11, 12, 13]), 0)
    (first,) = side.build_connector_meta(SimpleNamespace(num_scheduled_tokens={"p1": 100})).sends
    # Tokens 256-299 of block 2 are computed, the rest of it is not: it goes with the next chunk.
    assert (first.first_block, first.block_ids, first.is_last) == (0, [10, 11], False)
    req.num_computed_tokens = 300
    assert side.build_connector_meta(SimpleNamespace(num_scheduled_tokens={"p1": 50})).sends == []  # no block done
    req.num_computed_tokens = 350
    (second,) = side.build_connector_meta(SimpleNamespace(num_scheduled_tokens={"p1": 50})).sends
    assert (second.first_block, second.block_ids, second.is_last) == (2, [12, 13], True)
    assert (second.dest, second.transfer_id, second.num_tokens) == ("10.0.0.2:7500", "t9", 400)
    # The producer keeps its blocks until the worker reports the push finished.
    hold, out = side.request_finished(req, [10, 11, 12, 13])
    assert hold and out[params.KEY]["transfer_id"] == "t9"


def test_prefill_leaves_out_the_whole_blocks_the_decode_engine_holds_but_never_the_last():
    side = _side({"p1": [10, 11, 12, 13], "p2": [20, 21]})
    # The decode engine holds 300 tokens: blocks 0 and 1 stay; block 2 (tokens 256-383) goes.
    held = _request("p1", 400, params.for_prefill("t1", "h:1", skip_tokens=300))
    side.update_state_after_alloc(held, _blocks([10, 11, 12, 13]), 0)
    # Held all but its last token (a prompt ends with its last block): that block still goes.
    whole = _request("p2", 256, params.for_prefill("t2", "h:1", skip_tokens=255 + BS))
    side.update_state_after_alloc(whole, _blocks([20, 21]), 0)
    jobs = side.build_connector_meta(SimpleNamespace(num_scheduled_tokens={"p1": 400, "p2": 256})).sends
    assert [(j.transfer_id, j.first_block, j.block_ids) for j in jobs] == [("t1", 2, [12, 13]), ("t2", 1, [21])]


def test_decode_holding_what_the_transfer_leaves_out_loads_only_the_rest():
    side = _side()
    req = _request("r1", 400, params.for_decode("t1", skip_tokens=300))
    assert side.get_num_new_matched_tokens(req, 256) == (144, True)  # 2 whole blocks from its own cache
    side.update_state_after_alloc(req, _blocks([4, 5, 6, 7]), 144)
    (job,) = side.build_connector_meta(SimpleNamespace(num_scheduled_tokens={})).loads
    assert (job.first_block, job.block_ids) == (2, [6, 7])


def test_decode_lacking_what_the_transfer_leaves_out_computes_its_prompt_and_cancels_the_transfer():
    side = _side()
    req = _request("r1", 400, params.for_decode("t1", skip_tokens=300))
    assert side.get_num_new_matched_tokens(req, BS) == (0, False)  # holds 1 of the 2 blocks left out
    side.update_state_after_alloc(req, _blocks([4, 5, 6, 7]), 0)
    meta = side.build_connector_meta(SimpleNamespace(num_scheduled_tokens={}))
    assert meta.loads == [] and "computing the prompt here" in meta.cancels["t1"]
    assert side.get_num_new_matched_tokens(req, BS) == (0, False)  # asked again: still computed here


def test_prefill_request_finished_before_any_push_frees_its_blocks_at_once():
    side = _side()
    req = _request("p1", 40, params.for_prefill("t1", "h:1"))
    assert side.request_finished(req, [])[0] is False


def test_decode_outcome_reaches_the_request_output_and_late_reports_are_dropped():
    side = _side()
    req = _request("r1", 10, params.for_decode("t1"))
    side.update_state_after_alloc(req, _blocks([2]), 10)
    report = TransferReport("t1", "DONE", 10, 4096, exposed_ms=3.0)
    side.update_connector_output(GrpcWorkerMetadata({"r1": report, "gone": report}))
    hold, out = side.request_finished(req, [2])
    assert not hold and out[params.KEY]["state"] == "DONE" and out[params.KEY]["tokens"] == 10
    assert "gone" not in side._reports


def test_a_tensor_parallel_load_reports_once_for_every_rank_even_when_they_finish_in_different_steps():
    side = _side()
    req = _request("r1", 129, params.for_decode("t1", src_tp=2))
    side.get_num_new_matched_tokens(req, 0)
    side.update_state_after_alloc(req, _blocks([7, 3]), 129)
    (job,) = side.build_connector_meta(SimpleNamespace(num_scheduled_tokens={})).loads
    assert job.src_tp == 2
    rank0 = TransferReport("t1", "DONE", tokens=129, bytes=100, exposed_ms=4.0, ready_unix_ns=10)
    rank1 = TransferReport("t1", "DONE", tokens=129, bytes=100, exposed_ms=7.0, ready_unix_ns=20)
    side.update_connector_output(GrpcWorkerMetadata({"r1": rank0}))
    side.update_connector_output(GrpcWorkerMetadata({"r1": rank1}))  # the other rank, a step later
    _, out = side.request_finished(req, [7, 3])
    report = out[params.KEY]
    assert (report["state"], report["bytes"], report["exposed_ms"], report["ready_unix_ns"]) == ("DONE", 200, 7.0, 20)


def test_a_cancelled_tensor_parallel_transfer_cancels_every_rank_part():
    side = _side()
    side.request_finished(_request("r1", 50, params.for_decode("t1", src_tp=2)), [])
    assert side.build_connector_meta(SimpleNamespace(num_scheduled_tokens={})).cancels.keys() == {"t1/tp0", "t1/tp1"}
