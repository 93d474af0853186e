"""The gRPC API over a real grpc.aio server: health, reflection, and every refusal that
happens before an engine is involved. Streaming generation is tested against a real
engine by the end-to-end tests."""

from __future__ import annotations

import json
import random

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from pdserve.deployments.api.grpc_api import (
    MAX_RECEIVE_BYTES,
    SERVICE,
    GrpcHealth,
    _response,
    start_grpc_server,
)
from pdserve.errors import Overloaded
from pdserve.ports import free_port
from pdserve.prefill.requests import (
    SLO,
    GenerateChunk,
    Sampling,
    SLOReport,
    TokenLogprob,
)
from pdserve.prefill.structured import StructuredOutput
from pdserve.proto import pdserve_pb2 as pb
from tests.deployments.api.fake_grpc_frontend import MODEL, FakeValidatingFrontend


@pytest.fixture
def frontend() -> FakeValidatingFrontend:
    return FakeValidatingFrontend()


@pytest.fixture
def health_status() -> GrpcHealth:
    return GrpcHealth()


@pytest.fixture
async def channel(frontend, health_status):
    port = free_port()
    server = await start_grpc_server(lambda: frontend, port, health_status=health_status)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield ch
    await server.stop(grace=None)


def _generate(channel: grpc.aio.Channel):
    return channel.unary_stream(f"/{SERVICE}/Generate", request_serializer=pb.GenerateRequest.SerializeToString,
                                response_deserializer=pb.GenerateResponse.FromString)


def _generate_unary(channel: grpc.aio.Channel):
    return channel.unary_unary(f"/{SERVICE}/GenerateUnary", request_serializer=pb.GenerateRequest.SerializeToString,
                               response_deserializer=pb.GenerateResponse.FromString)


async def _stream_error(channel: grpc.aio.Channel, req: pb.GenerateRequest, metadata=None) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in _generate(channel)(req, metadata=metadata, timeout=10):
            pass
    return info.value


async def _health(channel: grpc.aio.Channel, service: str) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    return reply.status


def _tokens(*ids: int, **fields) -> pb.GenerateRequest:
    return pb.GenerateRequest(model=MODEL, prompt_token_ids=pb.TokenIds(ids=ids), **fields)


async def test_health_is_serving_until_the_ingress_flips_it(channel, health_status):
    for service in ("", SERVICE):
        assert await _health(channel, service) == health_pb2.HealthCheckResponse.SERVING
    await health_status.set_serving(False)
    for service in ("", SERVICE):
        assert await _health(channel, service) == health_pb2.HealthCheckResponse.NOT_SERVING


async def test_reflection_lists_generation_health_and_reflection(channel):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = [r async for r in stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))]
    names = {s.name for s in replies[0].list_services_response.service}
    assert names == {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}


@pytest.mark.parametrize(("req", "words"), [
    (pb.GenerateRequest(model=MODEL), "one of prompt, chat or prompt_token_ids"),
    (pb.GenerateRequest(prompt="hi"), "model is required"),
    (pb.GenerateRequest(model=MODEL, prompt=""), "prompt must not be empty"),
    (_tokens(), "prompt_token_ids must not be empty"),
    (_tokens(1, -2), "prompt_token_ids[1] is -2"),
    (_tokens(2**31), "prompt_token_ids[0] is 2147483648"),
    (_tokens(1, max_tokens=0), "max_tokens"),
    (_tokens(1, max_tokens=-1), "max_tokens"),
    (_tokens(1, max_tokens=-(2**63)), "max_tokens"),
    (_tokens(1, max_tokens=2**31 - 1), "does not fit the context"),
    (_tokens(1, max_tokens=2**63 - 1), "does not fit the context"),
    (_tokens(1, temperature=5), "temperature"),
    (_tokens(1, temperature=-0.5), "temperature"),
    (_tokens(1, temperature=float("nan")), "temperature"),
    (_tokens(1, top_p=0), "top_p"),
    (_tokens(1, top_p=-1), "top_p"),
    (_tokens(1, top_p=float("inf")), "top_p"),
    (_tokens(1, stop=["a", "b", "c", "d", "e"]), "stop"),
    (_tokens(1, stop=[""]), "stop"),
    (pb.GenerateRequest(model=MODEL, chat=pb.ChatMessages()), "at least one message"),
    (pb.GenerateRequest(model=MODEL, chat=pb.ChatMessages(messages=[pb.Message(role="robot", content="hi")])),
     "chat.messages[0].role is 'robot'"),
    (_tokens(*range(16)), "does not fit the context"),
], ids=lambda v: v if isinstance(v, str) else "")
async def test_invalid_requests_are_invalid_argument(channel, frontend, req, words):
    err = await _stream_error(channel, req)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in err.details()
    assert frontend.routed == []


async def test_unary_refuses_as_the_stream_does(channel):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _generate_unary(channel)(_tokens(1, max_tokens=0), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_tokens" in info.value.details()


async def test_another_models_name_is_not_found(channel):
    err = await _stream_error(channel, pb.GenerateRequest(model="gpt-4", prompt="hi"))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "'gpt-4'" in err.details() and MODEL in err.details()


async def test_invalid_utf8_is_refused_and_the_server_keeps_serving(channel):
    model = MODEL.encode()
    raw = bytes([0x0A, len(model)]) + model + bytes([0x12, 2, 0xFF, 0xFE])  # field 2 (prompt) = b"\xff\xfe"
    call = channel.unary_unary(f"/{SERVICE}/GenerateUnary", request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(raw, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await _health(channel, SERVICE) == health_pb2.HealthCheckResponse.SERVING


async def _still_serving(channel: grpc.aio.Channel, frontend: FakeValidatingFrontend) -> None:
    """Health says SERVING and a valid request still gets through to the frontend's routing."""
    assert await _health(channel, SERVICE) == health_pb2.HealthCheckResponse.SERVING
    routed = len(frontend.routed)
    err = await _stream_error(channel, _tokens(1, 2))
    assert err.code() == grpc.StatusCode.UNAVAILABLE and len(frontend.routed) == routed + 1


async def test_a_request_over_the_receive_limit_is_resource_exhausted_and_the_server_keeps_serving(channel, frontend):
    oversized = pb.GenerateRequest(model=MODEL, prompt="a" * MAX_RECEIVE_BYTES)
    assert oversized.ByteSize() > MAX_RECEIVE_BYTES
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _generate_unary(channel)(oversized, timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert frontend.routed == []
    await _still_serving(channel, frontend)
    largest = pb.GenerateRequest(model=MODEL, prompt="a" * (MAX_RECEIVE_BYTES - 64))
    assert largest.ByteSize() <= MAX_RECEIVE_BYTES
    with pytest.raises(grpc.aio.AioRpcError) as info:  # reaches the frontend, which has no tokenizer
        await _generate_unary(channel)(largest, timeout=30)
    assert (info.value.code(), info.value.details()) == (grpc.StatusCode.UNAVAILABLE, "this frontend has no tokenizer")


def _garbage_requests(seed: int = 0, count: int = 200) -> list[bytes]:
    """Seeded random byte strings, then hand-made wire-format traps: groups of an unknown field
    nested 50,000 deep, an 11-byte varint, a length prefix far past the end."""
    rng = random.Random(seed)
    randoms = [rng.randbytes(rng.randrange(1, 64)) for _ in range(count)]
    return [*randoms, bytes([0xF3, 0x01]) * 50_000, bytes([0x28]) + b"\xff" * 10 + b"\x01",
            bytes([0x12, 0xFF, 0xFF, 0xFF, 0x0F]) + b"ab"]


async def test_random_bytes_as_a_request_are_invalid_argument_and_the_server_keeps_serving(channel, frontend):
    unary = channel.unary_unary(f"/{SERVICE}/GenerateUnary", request_serializer=None, response_deserializer=None)
    stream = channel.unary_stream(f"/{SERVICE}/Generate", request_serializer=None, response_deserializer=None)
    codes = []
    for i, raw in enumerate(_garbage_requests()):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            if i % 2:
                await unary(raw, timeout=10)
            else:
                async for _ in stream(raw, timeout=10):
                    pass
        codes.append(info.value.code())
    assert set(codes) == {grpc.StatusCode.INVALID_ARGUMENT}
    assert frontend.routed == []
    await _still_serving(channel, frontend)


async def test_a_valid_request_reaches_the_frontend_with_its_sampling_and_trace(channel, frontend):
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    req = _tokens(1, 2, max_tokens=3, temperature=0.7, top_p=0.9, stop=["\n"], seed=7)
    err = await _stream_error(channel, req, metadata=(("traceparent", traceparent), ("x-other", "no")))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    (routed,) = frontend.routed
    assert routed.prompt_token_ids == [1, 2]
    assert routed.sampling == Sampling(max_tokens=3, temperature=0.7, top_p=0.9, stop=["\n"], seed=7)
    assert routed.trace_carrier == {"traceparent": traceparent}


async def test_vllms_sampling_options_reach_the_frontend_as_over_http_and_bad_ones_are_invalid_argument(
        channel, frontend):
    await _stream_error(channel, _tokens(1, max_tokens=8, top_k=5, min_p=0.1, repetition_penalty=1.2,
                                         presence_penalty=0.5, frequency_penalty=-0.3, min_tokens=2,
                                         stop_token_ids=[7, 9], logit_bias={42: -100.0, 3: 2.5}))
    assert frontend.routed[-1].sampling == Sampling(
        max_tokens=8, top_k=5, min_p=0.1, repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=-0.3,
        min_tokens=2, stop_token_ids=[7, 9], logit_bias={42: -100.0, 3: 2.5})
    for bad in ({"top_k": -2}, {"min_p": 1.5}, {"presence_penalty": 3.0}, {"min_tokens": 9, "max_tokens": 8},
                {"stop_token_ids": [-1]}, {"logit_bias": {1: 101.0}}, {"logit_bias": {-1: 1.0}},
                {"repetition_penalty": float("nan")}):
        err = await _stream_error(channel, _tokens(1, **bad))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and next(iter(bad)) in err.details(), err.details()


async def test_structured_outputs_reach_the_frontend_as_over_http_and_bad_ones_are_invalid_argument(
        channel, frontend):
    schema = {"type": "object", "properties": {"capital": {"type": "string"}}}
    for given, expected in [
        (pb.StructuredOutputs(json_schema=json.dumps(schema), disable_any_whitespace=True),
         StructuredOutput(json_schema=schema, disable_any_whitespace=True)),
        (pb.StructuredOutputs(choice=pb.Choices(choices=["yes", "no"])), StructuredOutput(choice=["yes", "no"])),
        (pb.StructuredOutputs(json_object=True), StructuredOutput(json_object=True)),
        (pb.StructuredOutputs(regex="[0-9]+"), StructuredOutput(regex="[0-9]+")),
    ]:
        await _stream_error(channel, _tokens(1, structured_outputs=given))
        assert frontend.routed[-1].sampling.structured == expected
    for bad, says in [(pb.StructuredOutputs(json_schema="{not json"), "not JSON"),
                      (pb.StructuredOutputs(regex="[a-z"), "Unclosed"),
                      (pb.StructuredOutputs(choice=pb.Choices()), "at least 1"),
                      (pb.StructuredOutputs(disable_any_whitespace=True), "exactly one constraint")]:
        err = await _stream_error(channel, _tokens(1, structured_outputs=bad))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and says in err.details(), err.details()
        assert err.details().startswith("structured_outputs")


async def test_the_requests_objectives_reach_the_frontend_and_bad_ones_are_invalid_argument(channel, frontend):
    await _stream_error(channel, _tokens(1, ttft_ms=300, tpot_ms=40, priority=2))
    assert frontend.routed[-1].slo == SLO(300.0, 40.0, 2)
    for bad in ({"ttft_ms": -1}, {"tpot_ms": 0}, {"tpot_ms": -3}, {"priority": 10}, {"priority": -1},
                {"ttft_ms": float("nan")}, {"ttft_ms": float("inf")}, {"tpot_ms": float("nan")}):
        err = await _stream_error(channel, _tokens(1, **bad))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and next(iter(bad)) in err.details()


async def test_a_requests_session_reaches_the_frontend_and_an_oversized_one_is_invalid_argument(channel, frontend):
    await _stream_error(channel, _tokens(1, session_id="trip-42"))
    assert frontend.routed[-1].session_id == "trip-42"
    err = await _stream_error(channel, _tokens(1, session_id="s" * 257))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "session_id" in err.details()


def test_the_last_message_says_how_much_of_the_prompt_was_cached() -> None:
    usage = _response(GenerateChunk("x", [5], 3, 2, "stop", cached_tokens=256), "id").usage
    assert usage.cached_tokens == 256
    assert not _response(GenerateChunk("x", [5], 3, 2, "stop"), "id").usage.HasField("cached_tokens")


def test_each_tokens_logprobs_travel_with_its_message() -> None:
    chunk = GenerateChunk("Hi", [5, 6], 3, 2, logprobs=[TokenLogprob("H", -0.5, [("H", -0.5), ("A", -1.25)]),
                                                      TokenLogprob("i", -9999.0, [])])
    sent = _response(chunk, "id").logprobs
    assert [(t.token, t.logprob, [(a.token, a.logprob) for a in t.top]) for t in sent] == [
        ("H", -0.5, [("H", -0.5), ("A", -1.25)]), ("i", -9999.0, [])]
    assert not _response(GenerateChunk("x", [5], 3, 1), "id").logprobs


async def test_logprobs_reach_the_frontend_and_a_bad_count_is_invalid_argument(channel, frontend):
    await _stream_error(channel, _tokens(1, logprobs=3))
    assert frontend.routed[-1].sampling.logprobs == 3
    err = await _stream_error(channel, _tokens(1, logprobs=21))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "logprobs" in err.details()


def test_the_last_message_reports_the_slo() -> None:
    chunk = GenerateChunk("x", [5], 3, 2, "stop", slo=SLOReport(120.0, None, SLO(100.0, 50.0, 1)))
    slo = _response(chunk, "id").slo
    assert (slo.ttft_ms, slo.ttft_objective_ms, slo.ttft_met, slo.HasField("tpot_ms"), slo.tpot_met) == (
        120.0, 100.0, False, False, True)
    assert not _response(GenerateChunk("x", [5], 3, 1), "id").HasField("slo")


async def test_overloaded_says_when_to_retry(channel, frontend):
    frontend.refusal = Overloaded("every decode instance is full", retry_after_s=2.6)
    err = await _stream_error(channel, _tokens(1))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.details() == "every decode instance is full"
    assert ("retry-after-s", "3") in tuple(err.trailing_metadata())


async def test_an_unexpected_exception_is_internal_and_the_server_keeps_serving(health_status):
    def broken_frontend() -> FakeValidatingFrontend:
        raise RuntimeError("frontend is not wired yet")

    port = free_port()
    server = await start_grpc_server(broken_frontend, port, health_status=health_status)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await _generate_unary(ch)(_tokens(1), timeout=10)
            assert (info.value.code(), info.value.details()) == (grpc.StatusCode.INTERNAL, "internal error (RuntimeError)")
            err = await _stream_error(ch, _tokens(1))
            assert (err.code(), err.details()) == (grpc.StatusCode.INTERNAL, "internal error (RuntimeError)")
            assert await _health(ch, "") == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop(grace=None)
