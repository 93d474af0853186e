"""Request-level kv_transfer_params and the typed KVTransferSettings."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest

from pdserve.config.kvtransfer import KVTransferSettings
from pdserve.kvtransfer import params
from pdserve.kvtransfer.params import RecvParams, SendParams


def test_for_prefill_round_trips_through_parse():
    assert params.parse(params.for_prefill("tid-1", "10.0.0.2:7000", lease_ms=1234)) == SendParams(
        "tid-1", "10.0.0.2:7000", 1234
    )
    assert params.parse(params.for_prefill("tid-1", "host:1")).lease_ms == 30_000


def test_prefill_params_carry_the_trace_parent_for_the_transfer():
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert params.parse(params.for_prefill("t", "h:1", trace_parent=tp)).trace_parent == tp
    assert "trace_parent" not in params.for_prefill("t", "h:1")[params.KEY]


def test_the_tokens_a_decode_engine_holds_round_trip_on_both_sides():
    assert params.parse(params.for_prefill("t", "h:1", skip_tokens=256)).skip_tokens == 256
    assert params.parse(params.for_decode("t", kv_tokens=300, skip_tokens=256)) == RecvParams("t", 30_000, 300, 256)
    assert "skip_tokens" not in params.for_prefill("t", "h:1")[params.KEY]


def test_for_decode_round_trips_through_parse():
    assert params.parse(params.for_decode("tid-2", lease_ms=50)) == RecvParams("tid-2", 50)
    assert params.parse(params.for_decode("tid-2")) == RecvParams("tid-2", 30_000)
    assert params.parse(params.for_decode("tid-2", kv_tokens=7)) == RecvParams("tid-2", 30_000, 7)


def test_params_live_under_their_own_key_next_to_foreign_ones():
    merged = {"other_connector": {"x": 1}, **params.for_decode("t")}
    assert params.parse(merged) == RecvParams("t", 30_000)


@pytest.mark.parametrize("value", [None, {}, {"other_connector": {"op": "send"}}])
def test_requests_without_pdserve_params_parse_to_none(value):
    assert params.parse(value) is None


def _with(**entry):
    base = {"op": "send", "transfer_id": "t", "dest": "h:1", "lease_ms": 100}
    return {params.KEY: {**base, **entry}}


@pytest.mark.parametrize(
    "value, field",
    [
        ({params.KEY: ["send"]}, "pdserve_kv must be a mapping"),
        ({params.KEY: "send"}, "pdserve_kv must be a mapping"),
        (_with(transfer_id=""), "transfer_id"),
        (_with(transfer_id=None), "transfer_id"),
        (_with(transfer_id=42), "transfer_id"),
        (_with(lease_ms=0), "lease_ms"),
        (_with(lease_ms=-5), "lease_ms"),
        (_with(lease_ms="100"), "lease_ms"),
        (_with(lease_ms=1.5), "lease_ms"),
        pytest.param(_with(lease_ms=True), "lease_ms", id="bool_lease_ms"),
        (_with(dest="nohostport"), "dest"),
        (_with(dest=None), "dest"),
        (_with(dest=7000), "dest"),
        (_with(op="push"), "op"),
        (_with(op=None), "op"),
        (_with(trace_parent=7), "trace_parent"),
        (_with(trace_parent="x" * 300), "trace_parent"),
        (_with(op="recv", kv_tokens=0), "kv_tokens"),
        (_with(op="recv", kv_tokens="12"), "kv_tokens"),
        pytest.param(_with(op="recv", kv_tokens=True), "kv_tokens", id="bool_kv_tokens"),
        (_with(skip_tokens=-1), "skip_tokens"),
        (_with(op="recv", skip_tokens=1.5), "skip_tokens"),
        pytest.param(_with(skip_tokens=True), "skip_tokens", id="bool_skip_tokens"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_malformed_params_raise_value_error_naming_the_field(value, field):
    with pytest.raises(ValueError, match=field):
        params.parse(value)


def test_recv_params_do_not_need_a_dest():
    assert params.parse({params.KEY: {"op": "recv", "transfer_id": "t"}}) == RecvParams("t", 30_000)


def test_default_settings_are_valid_and_loopback():
    s = KVTransferSettings()
    assert s.listen_addr.startswith("127.0.0.1:") and s.require_secret and s.secret_value == ""
    assert s.chunk_bytes <= s.max_frame_bytes - 4096


@pytest.mark.parametrize("which", ["tls_cert_file", "tls_key_file"])
def test_tls_cert_and_key_must_be_set_together(which):
    with pytest.raises(pydantic.ValidationError, match="tls_cert_file and tls_key_file"):
        KVTransferSettings(**{which: Path("/tmp/x.pem")})
    KVTransferSettings(tls_cert_file=Path("/tmp/c.pem"), tls_key_file=Path("/tmp/k.pem"))


@pytest.mark.parametrize("which", ["tls_client_cert_file", "tls_client_key_file"])
def test_the_senders_client_cert_and_key_must_be_set_together(which):
    with pytest.raises(pydantic.ValidationError, match="tls_client_cert_file and tls_client_key_file"):
        KVTransferSettings(tls_ca_file=Path("/tmp/ca.pem"), **{which: Path("/tmp/x.pem")})


def test_a_senders_client_cert_needs_the_tls_ca_file_it_connects_with():
    pair = dict(tls_client_cert_file=Path("/tmp/c.pem"), tls_client_key_file=Path("/tmp/k.pem"))
    with pytest.raises(pydantic.ValidationError, match="tls_client_cert_file .* needs tls_ca_file"):
        KVTransferSettings(**pair)
    assert KVTransferSettings(tls_ca_file=Path("/tmp/ca.pem"), **pair).tls_client_key_file == Path("/tmp/k.pem")


def test_a_receivers_client_ca_needs_its_own_cert_and_key():
    with pytest.raises(pydantic.ValidationError, match="tls_client_ca_file .* needs tls_cert_file and tls_key_file"):
        KVTransferSettings(tls_client_ca_file=Path("/tmp/ca.pem"))
    s = KVTransferSettings(tls_client_ca_file=Path("/tmp/ca.pem"), tls_cert_file=Path("/tmp/c.pem"),
                           tls_key_file=Path("/tmp/k.pem"))
    assert s.tls_client_ca_file == Path("/tmp/ca.pem")


@pytest.mark.parametrize("chunk, frame", [(2 << 20, 1 << 20), (1 << 20, 1 << 20), ((1 << 20) - 4095, 1 << 20)])
def test_chunk_bytes_must_fit_in_a_frame_with_room_for_the_header(chunk, frame):
    with pytest.raises(pydantic.ValidationError, match="chunk_bytes"):
        KVTransferSettings(chunk_bytes=chunk, max_frame_bytes=frame)
    assert KVTransferSettings(chunk_bytes=frame - 4096, max_frame_bytes=frame).chunk_bytes == frame - 4096


def test_the_secret_is_not_shown_in_repr_str_or_dump():
    s = KVTransferSettings(secret="hunter2-cluster-secret")
    assert s.secret_value == "hunter2-cluster-secret"
    for text in (repr(s), str(s), s.model_dump_json(), str(s.model_dump())):
        assert "hunter2" not in text


def test_extra_fields_are_forbidden():
    with pytest.raises(pydantic.ValidationError, match="extra"):
        KVTransferSettings(chunk_mib=8)


@pytest.mark.parametrize(
    "field, value",
    [("chunk_bytes", 100), ("num_streams", 0), ("num_streams", 17), ("lease_ms", 10), ("connect_timeout_s", 0)],
)
def test_out_of_range_values_are_refused(field, value):
    with pytest.raises(pydantic.ValidationError, match=field):
        KVTransferSettings(**{field: value})


def test_settings_are_frozen():
    s = KVTransferSettings()
    with pytest.raises(pydantic.ValidationError):
        s.num_streams = 4
