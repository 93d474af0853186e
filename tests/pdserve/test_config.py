import pytest

from pdserve.config.cluster import ConfigError, load_config, parse_config


def test_default_config_is_one_prefill_and_one_decode_engine_each_on_its_own_core():
    cfg = load_config(None)
    pools = cfg.pools()
    assert cfg.mode == "disaggregated" and set(pools) == {"prefill", "decode"}
    assert (pools["prefill"].replicas, pools["decode"].replicas) == (1, 1)
    assert pools["prefill"].cpu_binds == ["0"] and pools["decode"].cpu_binds == ["1"]


def test_default_dtype_is_float32_on_cpu_pools_and_left_to_vllm_on_gpu_pools():
    assert load_config(None).dtype == "auto"
    assert load_config(None).engine_dtype == "float32"
    assert parse_config({"mode": "colocated"}).engine_dtype == "float32"
    gpu = {"num_gpus": 1}
    assert parse_config({"prefill": gpu, "decode": gpu}).engine_dtype == "auto"
    assert parse_config({"dtype": "bfloat16"}).engine_dtype == "bfloat16"


def test_auto_dtype_that_would_differ_between_a_cpu_and_a_gpu_pool_is_refused():
    with pytest.raises(ConfigError, match="set dtype explicitly"):
        parse_config({"decode": {"num_gpus": 1}})
    assert parse_config({"dtype": "float32", "decode": {"num_gpus": 1}}).engine_dtype == "float32"


def test_colocated_mode_deploys_only_the_colocated_pool_with_small_prefill_chunks():
    cfg = parse_config({"mode": "colocated"})
    assert list(cfg.pools()) == ["colocated"]
    assert cfg.colocated.engine_args["max_num_batched_tokens"] == 256


def test_adaptive_mode_deploys_one_pool_of_engines_that_send_and_receive_kv():
    from pdserve.kvtransfer.vllm_config import kv_transfer_config

    cfg = parse_config({"mode": "adaptive"})
    assert list(cfg.pools()) == ["adaptive"] and cfg.adaptive.replicas == 2
    assert cfg.adaptive.engine_args["max_num_batched_tokens"] == 256
    assert kv_transfer_config("adaptive", {}).kv_role == "kv_both"
    assert kv_transfer_config("prefill", {}).kv_role == "kv_producer"


def test_accelerator_types_place_pools_on_different_node_types():
    cfg = parse_config({"prefill": {"accelerator_type": "H100", "num_gpus": 1},
                        "decode": {"accelerator_type": "L4", "num_gpus": 1, "resources": {"decode_slot": 1}}})
    assert cfg.prefill.ray_actor_options() == {"num_cpus": 1.0, "num_gpus": 1.0, "accelerator_type": "H100"}
    assert cfg.decode.ray_actor_options()["resources"] == {"decode_slot": 1}


def test_errors_name_every_bad_field(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text("mode: split\ndecode:\n  replicas: 0\n  engine_args: {not_an_arg: 1}\nkv_transfer: {lease_ms: 5}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    for expected in ("mode:", "decode.replicas:", "not_an_arg", "kv_transfer.lease_ms:"):
        assert expected in msg


def test_pool_may_not_override_what_must_agree_across_pools():
    with pytest.raises(ConfigError, match="dtype"):
        parse_config({"prefill": {"engine_args": {"dtype": "float16"}}})


def test_unknown_top_level_field_and_non_mapping_file_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="replcas"):
        parse_config({"prefill": {"replcas": 2}})
    path = tmp_path / "c.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_secret_is_not_printed_in_a_dump():
    cfg = parse_config({"kv_transfer": {"secret": "s3cr3t-value"}})
    assert "s3cr3t-value" not in str(cfg.model_dump(mode="json")) and "s3cr3t-value" not in repr(cfg)


def test_cli_refuses_a_bad_config_with_exit_2_and_the_field_names(tmp_path, capsys):
    from pdserve.cli.main import main

    path = tmp_path / "cluster.yaml"
    path.write_text("prefill: {replicas: 0}\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["config", "show", "--config", str(path)])
    assert exit_info.value.code == 2
    assert "prefill.replicas" in capsys.readouterr().err


def test_cli_prints_the_config_with_defaults_filled_in(tmp_path, capsys):
    from pdserve.cli.main import main

    path = tmp_path / "cluster.yaml"
    path.write_text("mode: colocated\n")
    assert main(["config", "show", "--config", str(path)]) == 0
    shown = capsys.readouterr().out
    assert "mode: colocated" in shown and "http_port: 8000" in shown


def test_a_pool_section_overrides_the_role_defaults_field_by_field():
    cfg = parse_config({"decode": {"replicas": 2}, "colocated": {"engine_args": {"max_num_seqs": 8}}})
    assert cfg.decode.replicas == 2 and cfg.decode.cpu_binds == ["1"]
    assert cfg.colocated.engine_args == {"max_num_batched_tokens": 256, "max_num_seqs": 8}
    assert parse_config({"decode": {"cpu_binds": []}}).decode.cpu_binds == []


def test_routing_profiles_are_per_accelerator_with_a_default_and_slo_policy_is_checked():
    cfg = parse_config({"routing": {"profiles": {
        "default": {"prefill_base_ms": 10, "prefill_ms_per_token": 0.1, "decode_base_ms": 10, "decode_ms_per_seq": 0.1,
                    "decode_ms_per_1k_context_tokens": 0.5},
        "L4": {"prefill_base_ms": 30, "prefill_ms_per_token": 0.3, "decode_base_ms": 20, "decode_ms_per_seq": 0.2,
               "decode_ms_per_1k_context_tokens": 1.0}}}, "slo": {"priority": 2, "on_unmeetable": "best_effort"}})
    assert cfg.routing.profiles["L4"].prefill_ms(100, 0) == 60.0 and cfg.slo.priority == 2
    with pytest.raises(ConfigError) as err:
        parse_config({"routing": {"profiles": {"H100": cfg.routing.profiles["L4"].model_dump()}, "policy": "random"},
                      "slo": {"on_unmeetable": "queue"}})
    for where in ("routing.policy", "routing.profiles", "slo.on_unmeetable"):
        assert where in str(err.value)


def test_autoscaling_policy_path_is_relative_to_the_config_file(tmp_path):
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "scale.yaml").write_text("decode: {max_replicas: 4}\n")
    path = tmp_path / "cluster.yaml"
    path.write_text("autoscaling: {policy_file: policies/scale.yaml}\n")
    assert load_config(path).autoscaling.policy_file == str(tmp_path / "policies" / "scale.yaml")


def test_a_bad_autoscaling_policy_fails_the_config_naming_its_field(tmp_path):
    (tmp_path / "scale.yaml").write_text("decode: {max_replicas: 0}\n")
    path = tmp_path / "cluster.yaml"
    path.write_text("autoscaling: {policy_file: scale.yaml}\n")
    with pytest.raises(ConfigError, match="(?s)autoscaling.policy_file.*decode.max_replicas"):
        load_config(path)


def test_autoscaling_needs_the_disaggregated_pools():
    with pytest.raises(ConfigError, match="needs mode disaggregated"):
        parse_config({"mode": "colocated", "autoscaling": {"policy_file": "p.yaml"}})


def test_a_pool_buffers_experts_with_a_slot_budget_per_accelerator_type():
    cfg = parse_config({"decode": {"accelerator_type": "L4",
                                   "experts": {"slots": 8, "slots_by_accelerator": {"L4": 4}, "policy": "pinned_hot"}}})
    assert cfg.prefill.experts is None  # prefill touches nearly every expert: all resident
    engine = cfg.decode.experts.for_accelerator(cfg.decode.accelerator_type)
    assert (engine.slots, engine.policy) == (4, "pinned_hot")
    assert cfg.decode.experts.for_accelerator("H100").slots == 8


def test_bad_expert_buffering_is_refused_with_the_field_names():
    with pytest.raises(ConfigError) as err:
        parse_config({"decode": {"experts": {"slots": 0, "policy": "fifo", "slots_by_accelerator": {"L4": 0}}}})
    msg = str(err.value)
    for expected in ("decode.experts.slots", "decode.experts.policy", "slot budgets must be at least 1"):
        assert expected in msg
    with pytest.raises(ConfigError, match="worker_extension_cls"):
        parse_config({"decode": {"engine_args": {"worker_extension_cls": "x.Y"}}})


def test_fixed_kv_receiver_ports_must_fit_below_65536():
    assert parse_config({"kv_receiver_port": 5600, "kv_receiver_port_count": 4}).kv_receiver_port_count == 4
    with pytest.raises(ConfigError, match="runs past port 65535"):
        parse_config({"kv_receiver_port": 65535, "kv_receiver_port_count": 2})


@pytest.mark.parametrize("which", ["grpc_tls_cert_file", "grpc_tls_key_file"])
def test_the_grpc_apis_tls_cert_and_key_must_be_set_together(which):
    with pytest.raises(ConfigError, match="ingress: .*grpc_tls_cert_file and grpc_tls_key_file must be set together"):
        parse_config({"ingress": {which: "/etc/pdserve/tls/x.pem"}})
    cfg = parse_config({"ingress": {"grpc_tls_cert_file": "/etc/c.pem", "grpc_tls_key_file": "/etc/k.pem"}})
    assert str(cfg.ingress.grpc_tls_cert_file) == "/etc/c.pem" and cfg.ingress.grpc_tls_client_ca_file is None


def test_the_grpc_apis_client_ca_needs_its_server_cert_and_key():
    with pytest.raises(ConfigError, match="grpc_tls_client_ca_file .* needs grpc_tls_cert_file and grpc_tls_key_file"):
        parse_config({"ingress": {"grpc_tls_client_ca_file": "/etc/ca.pem"}})
    cfg = parse_config({"ingress": {"grpc_tls_cert_file": "/etc/c.pem", "grpc_tls_key_file": "/etc/k.pem",
                                    "grpc_tls_client_ca_file": "/etc/ca.pem"}})
    assert str(cfg.ingress.grpc_tls_client_ca_file) == "/etc/ca.pem"


def test_the_default_model_comes_with_its_familys_tool_parser_and_another_model_with_none(tmp_path):
    assert load_config(None).tool_call_parser == "xlam"  # SmolLM2's `<tool_call>[...]</tool_call>`
    assert parse_config({"model": str(tmp_path)}).tool_call_parser is None
    assert parse_config({"model": str(tmp_path), "tool_call_parser": "hermes"}).tool_call_parser == "hermes"
    assert parse_config({"tool_call_parser": None}).tool_call_parser is None  # "auto" refused


def test_the_ingress_serves_http_itself_on_its_own_port_by_default_and_every_port_differs():
    ingress = load_config(None).ingress
    assert (ingress.http_port, ingress.direct_http_port, ingress.grpc_port) == (8000, 8001, 50051)
    assert parse_config({"ingress": {"direct_http_port": None}}).ingress.direct_http_port is None
    for clash in ({"direct_http_port": 8000}, {"direct_http_port": 50051}, {"grpc_port": 8000}):
        with pytest.raises(ConfigError, match="must differ"):
            parse_config({"ingress": clash})


def test_further_adaptive_pools_deploy_beside_adaptive_with_its_chunked_prefill_and_only_in_adaptive_mode():
    cfg = parse_config({"mode": "adaptive", "adaptive_pools": {
        "l4": {"accelerator_type": "L4", "num_gpus": 1, "engine_args": {"max_num_seqs": 8}}}, "dtype": "bfloat16"})
    assert list(cfg.pools()) == ["adaptive", "adaptive-l4"]
    l4 = cfg.pools()["adaptive-l4"]
    assert l4.accelerator_type == "L4" and l4.replicas == 1
    assert l4.engine_args == {"max_num_batched_tokens": 256, "max_num_seqs": 8}
    with pytest.raises(ConfigError, match="adaptive_pools deploys only in mode adaptive"):
        parse_config({"adaptive_pools": {"l4": {}}})
    with pytest.raises(ConfigError, match="set dtype explicitly"):  # a GPU pool beside CPU ones, dtype auto
        parse_config({"mode": "adaptive", "adaptive_pools": {"l4": {"num_gpus": 1}}})
    with pytest.raises(ConfigError, match=r"pool names \['L4', 'a_b'\]"):
        parse_config({"mode": "adaptive", "adaptive_pools": {"L4": {}, "a_b": {}, "ok-1": {}}})


@pytest.mark.parametrize("mode", ["disaggregated", "adaptive"])
@pytest.mark.parametrize("split", [{"pipeline_parallel_size": 2}, {"data_parallel_size": 4}])
def test_engines_split_into_stages_or_data_ranks_are_refused_where_they_would_move_kv(mode, split):
    pool = "decode" if mode == "disaggregated" else "adaptive"
    with pytest.raises(ConfigError, match=rf"{pool}.engine_args .*{next(iter(split))}.*each tensor-parallel rank"):
        parse_config({"mode": mode, pool: {"engine_args": split}})
    colocated = parse_config({"mode": "colocated", "colocated": {"engine_args": split}})
    assert colocated.colocated.engine_args[next(iter(split))] == next(iter(split.values()))


@pytest.mark.parametrize("mode", ["disaggregated", "adaptive"])
def test_tensor_parallel_engines_move_kv_in_every_mode(mode):
    pools = ({"prefill": {"engine_args": {"tensor_parallel_size": 2}}, "decode": {"engine_args": {
        "tensor_parallel_size": 4}}} if mode == "disaggregated" else {"adaptive": {"engine_args": {
            "tensor_parallel_size": 2}}, "adaptive_pools": {"wide": {"engine_args": {"tensor_parallel_size": 4}}}})
    cfg = parse_config({"mode": mode, **pools})
    assert sorted(p.tp_size for p in cfg.pools().values()) == [2, 4]


def test_fixed_kv_receiver_ports_must_hold_every_rank_of_a_receiving_replica():
    tp4 = {"engine_args": {"tensor_parallel_size": 4}}
    with pytest.raises(ConfigError, match=r"pools \{'decode': 4\} .*kv_receiver_port_count is 2"):
        parse_config({"kv_receiver_port": 5600, "kv_receiver_port_count": 2, "decode": tp4})
    assert parse_config({"kv_receiver_port": 5600, "kv_receiver_port_count": 2, "prefill": tp4}).prefill.tp_size == 4
    assert parse_config({"kv_receiver_port": 5600, "kv_receiver_port_count": 4, "decode": tp4}).decode.tp_size == 4


def test_a_gpu_pool_needs_a_gpu_per_tensor_parallel_rank():
    with pytest.raises(ConfigError, match="tensor_parallel_size 2 runs a rank on each of 2 GPUs, but num_gpus is 1"):
        parse_config({"mode": "colocated", "colocated": {"num_gpus": 1, "engine_args": {"tensor_parallel_size": 2}}})
    assert parse_config({"mode": "colocated", "colocated": {"num_gpus": 0.5}}).colocated.num_gpus == 0.5
