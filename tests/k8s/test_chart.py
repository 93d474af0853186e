"""The Helm chart renders manifests that Kubernetes and KubeRay accept, carrying config that
pdserve accepts. Offline: Helm's own Go engine renders (helm_python), kubernetes-validate
checks built-in kinds strictly, the vendored KubeRay CRD checks the RayService; no cluster.
The security of what it renders is in test_chart_security; the rendering helpers in chart_render."""

from __future__ import annotations

import base64
import functools
from pathlib import Path

import helm_python
import jsonschema
import kubernetes_validate
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from pdserve.config.autoscaling_policy import load_policy, parse_policy
from pdserve.config.cluster import parse_config
from tests.k8s.chart_render import (
    K8S,
    NAMESPACE,
    VARIANTS,
    _ray_resources,
    _secret_holding,
    files,
    only,
    pods,
    render,
    render_manifests,
)

CRD = Path(__file__).resolve().parent / "crds" / "ray.io_rayservices.yaml"
KUBERNETES_VERSION = "1.33"


def _strict(schema):
    """The CRD schema with unknown fields refused, as `kubectl apply --validate=strict` does
    (Kubernetes would otherwise drop a misspelt field silently)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_validator(api_version: str) -> jsonschema.Draft7Validator:
    crd = yaml.load(CRD.read_text(), Loader=yaml.CSafeLoader)
    group, version = api_version.split("/")
    assert crd["spec"]["group"] == group
    [served] = [v for v in crd["spec"]["versions"] if v["name"] == version and v["served"]]
    schema = served["schema"]["openAPIV3Schema"]
    schema = {**schema, "properties": {**schema["properties"], "metadata": {"$ref": "#/$defs/metadata"}}}
    return jsonschema.Draft7Validator(_strict(schema) | {"$defs": {"metadata": METADATA}})


# The CRD leaves metadata to the API server; check the part a chart writes.
METADATA = {"type": "object", "required": ["name"], "properties": {
    "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
    "annotations": {"type": "object", "additionalProperties": {"type": "string"}}}}


def validate(doc: dict) -> None:
    """Raise if Kubernetes (built-in kinds) or KubeRay's CRD (ray.io kinds) would refuse `doc`."""
    if doc["apiVersion"].startswith("ray.io/"):
        crd_validator(doc["apiVersion"]).validate(doc)
    else:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_rendered_manifest_is_accepted_by_kubernetes_and_kuberay_schemas(variant):
    docs = render(VARIANTS[variant])
    assert {"RayService", "ConfigMap", "Service"} <= {d["kind"] for d in docs}
    for doc in docs:
        validate(doc)


@pytest.mark.parametrize("variant", VARIANTS)
def test_mounted_cluster_config_and_policy_are_accepted_by_pdserve(variant):
    docs = render(VARIANTS[variant])
    mounted = files(docs)
    cfg = parse_config(mounted["cluster.yaml"], "cluster.yaml")
    assert cfg.ingress.host == "0.0.0.0"  # reachable from the Service, not loopback only
    if cfg.autoscaling is None:
        assert "autoscaling.yaml" not in mounted
    else:
        assert cfg.autoscaling.policy_file == "/etc/pdserve/autoscaling.yaml"
        parse_policy(mounted["autoscaling.yaml"], "autoscaling.yaml")
    for template in pods(docs).values():
        config_volume = next(v for v in template["spec"]["volumes"] if v["name"] == "pdserve-config")
        assert config_volume["configMap"]["name"] == only(docs, "ConfigMap")["metadata"]["name"]
        mounts = template["spec"]["containers"][0]["volumeMounts"]
        assert {"name": "pdserve-config", "mountPath": "/etc/pdserve", "readOnly": True} in mounts


@pytest.mark.parametrize("variant", ["defaults", "autoscaling_off"])
def test_serve_config_runs_the_pdserve_builder_with_external_scaling_only_when_autoscaling(variant):
    docs = render(VARIANTS[variant])
    serve = ServeDeploySchema.model_validate(yaml.safe_load(only(docs, "RayService")["spec"]["serveConfigV2"]))
    [app] = serve.applications
    cfg = parse_config(files(docs)["cluster.yaml"])
    assert (app.name, app.import_path) == (cfg.app_name, "pdserve.deployments.rayservice:build")
    assert app.args == {"config": "/etc/pdserve/cluster.yaml"}
    assert app.external_scaler_enabled is (cfg.autoscaling is not None)
    assert serve.http_options.port == cfg.ingress.http_port


def test_service_sends_both_http_ports_and_grpc_to_the_head_pods_ports():
    docs = render()
    service, head = only(docs, "Service"), pods(docs)["head"]
    labels = head["metadata"]["labels"]
    assert {k: v for k, v in service["spec"]["selector"].items() if k != "ray.io/serve"}.items() <= labels.items()
    ports = {p["name"]: p["containerPort"] for p in head["spec"]["containers"][0]["ports"]}
    cfg = parse_config(files(docs)["cluster.yaml"])
    assert {(p["port"], ports[p["targetPort"]]) for p in service["spec"]["ports"]} == {
        (cfg.ingress.http_port, cfg.ingress.http_port), (cfg.ingress.grpc_port, cfg.ingress.grpc_port),
        (cfg.ingress.direct_http_port, cfg.ingress.direct_http_port)}


def test_without_the_ingress_http_server_no_port_is_declared_for_it():
    docs = render({"ingress": {"directHttpPort": None}})
    assert parse_config(files(docs)["cluster.yaml"]).ingress.direct_http_port is None
    assert "http-direct" not in {p["name"] for p in only(docs, "Service")["spec"]["ports"]}
    assert "http-direct" not in {p["name"] for p in pods(docs)["head"]["spec"]["containers"][0]["ports"]}


def test_the_ingress_serving_grpc_is_pinned_to_the_head_the_service_reaches():
    docs = render()
    head = only(docs, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]
    cfg = parse_config(files(docs)["cluster.yaml"])
    assert cfg.ingress.replicas == 1 and cfg.ingress.resources == {"pdserve_ingress": 1}
    assert _ray_resources(head)["pdserve_ingress"] >= 1
    workers = only(docs, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert all("pdserve_ingress" not in _ray_resources(g) for g in workers)


def test_each_pool_gets_a_worker_group_on_its_gpu_type_sized_in_pods():
    docs = render(VARIANTS["two_gpu_types"])
    groups = {g["groupName"]: g for g in only(docs, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    cfg = parse_config(files(docs)["cluster.yaml"])
    assert set(groups) == {"prefill-h100", "decode-l4"}
    for name, pool, per_pod in [("prefill-h100", cfg.prefill, 4), ("decode-l4", cfg.decode, 2)]:
        group = groups[name]
        provides = _ray_resources(group)
        # Ray places a replica only where every resource it asks for exists: its GPU type and its group.
        assert provides[f"accelerator_type:{pool.accelerator_type}"] == 1
        assert set(pool.resources) < set(provides) and all(
            provides[r] == per_pod * n for r, n in pool.resources.items())
        container = group["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == str(int(pool.num_gpus * per_pod))
    # Serve replicas -> pods: ceil(replicas / replicas per pod).
    assert [groups["prefill-h100"][k] for k in ("replicas", "minReplicas", "maxReplicas")] == [1, 1, 2]
    assert [groups["decode-l4"][k] for k in ("replicas", "minReplicas", "maxReplicas")] == [2, 1, 8]
    assert groups["prefill-h100"]["template"]["spec"]["nodeSelector"] == {"gpu": "h100"}
    assert cfg.pools()["prefill"].accelerator_type == "H100" and cfg.decode.accelerator_type == "L4"


def test_adaptive_mode_deploys_one_pool_whose_engines_pdserve_runs_as_adaptive():
    docs = render(VARIANTS["adaptive"])
    [group] = only(docs, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    cfg = parse_config(files(docs)["cluster.yaml"])
    assert cfg.mode == "adaptive" and list(cfg.pools()) == ["adaptive"] and cfg.autoscaling is None
    assert group["groupName"] == "adaptive-h100"
    assert [group[k] for k in ("replicas", "minReplicas", "maxReplicas")] == [2, 1, 4]  # 2 replicas a pod
    provides = _ray_resources(group)
    assert provides["accelerator_type:H100"] == 1
    assert all(provides[r] == 2 * n for r, n in cfg.adaptive.resources.items())
    assert group["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "adaptive"
    assert "autoscaling.yaml" not in files(docs)


def test_further_adaptive_pools_deploy_as_adaptive_pools_on_their_own_worker_groups():
    docs = render(VARIANTS["two_adaptive_pools"])
    groups = {g["groupName"]: g for g in only(docs, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    cfg = parse_config(files(docs)["cluster.yaml"])
    assert list(cfg.pools()) == ["adaptive", "adaptive-l4"] and list(cfg.adaptive_pools) == ["l4"]
    l4 = cfg.pools()["adaptive-l4"]
    assert (l4.accelerator_type, l4.replicas, l4.num_cpus) == ("L4", 6, cfg.adaptive.num_cpus)  # cpus: adaptive's
    assert list(groups) == ["adaptive-h100", "adaptive-l4-l4"]
    assert [groups["adaptive-l4-l4"][k] for k in ("replicas", "minReplicas", "maxReplicas")] == [2, 1, 4]  # 3 a pod
    assert _ray_resources(groups["adaptive-l4-l4"])["accelerator_type:L4"] == 1
    assert all(_ray_resources(groups["adaptive-l4-l4"])[r] == 3 * n for r, n in l4.resources.items())
    assert groups["adaptive-l4-l4"]["template"]["spec"]["nodeSelector"] == {"gpu": "l4"}
    assert "nodeSelector" not in groups["adaptive-h100"]["template"]["spec"]


def test_an_adaptive_pool_outside_mode_adaptive_refuses_to_render():
    with pytest.raises(helm_python.HelmRenderError, match="pools.adaptive-l4 is an adaptive pool"):
        render({"pools": {"adaptive-l4": {"acceleratorType": "L4"}}})


def test_adaptive_mode_with_pdserves_autoscaling_refuses_to_render():
    with pytest.raises(helm_python.HelmRenderError, match="mode adaptive needs autoscaling.enabled=false"):
        render({"mode": "adaptive"})


def test_policy_bounds_and_objectives_come_from_pool_and_slo_values():
    values = VARIANTS["two_gpu_types"]
    policy = parse_policy(files(render(values))["autoscaling.yaml"])
    assert (policy.prefill.accelerator_type, policy.prefill.gpus_per_replica) == ("H100", 2)
    assert (policy.prefill.min_replicas, policy.prefill.max_replicas) == (1, 8)
    assert (policy.decode.min_replicas, policy.decode.max_replicas) == (2, 16)
    assert (policy.prefill.ttft_ms, policy.decode.tpot_ms) == (2000, 200)
    assert policy.gpu_budget == 40 and policy.decode.kv_usage_target == 0.9  # the user's own fields stay


def test_with_in_tree_autoscaling_off_pdserve_may_only_get_and_patch_its_own_rayservice():
    docs = render(VARIANTS["pdserve_patches_worker_groups"])
    rayservice = only(docs, "RayService")
    name = rayservice["metadata"]["name"]
    assert rayservice["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is False
    assert only(docs, "Role")["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayservices"],
                                            "resourceNames": [name], "verbs": ["get", "patch"]}]
    binding, account = only(docs, "RoleBinding"), only(docs, "ServiceAccount")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": only(docs, "Role")["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"],
                                    "namespace": NAMESPACE}]
    templates = pods(docs)
    assert templates.pop("head")["spec"]["serviceAccountName"] == account["metadata"]["name"]
    assert all("serviceAccountName" not in t["spec"] for t in templates.values())
    target = parse_config(files(docs)["cluster.yaml"]).autoscaling.kubernetes
    groups = [g["groupName"] for g in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]]
    assert (target.namespace, target.rayservice, target.in_cluster) == (NAMESPACE, name, True)
    assert target.worker_groups == dict(zip(["prefill", "decode"], groups, strict=True))
    assert target.replicas_per_pod == {"prefill": 1, "decode": 1}


@pytest.mark.parametrize("variant", ["defaults", "autoscaling_off"])
def test_without_pdserve_patching_there_is_no_rbac_and_no_kubernetes_target(variant):
    docs = render(VARIANTS[variant])
    assert not {"ServiceAccount", "Role", "RoleBinding"} & {d["kind"] for d in docs}
    cfg = parse_config(files(docs)["cluster.yaml"])
    assert cfg.autoscaling is None or cfg.autoscaling.kubernetes is None
    assert all("serviceAccountName" not in t["spec"] for t in pods(docs).values())


def _head_env(docs: list[dict]) -> list[dict]:
    return pods(docs)["head"]["spec"]["containers"][0]["env"]


def test_existing_secrets_are_referenced_and_not_created():
    docs = render(VARIANTS["existing_secrets"])
    assert not [d for d in docs if d["kind"] == "Secret"]
    env = _head_env(docs)
    assert {"name": "PDSERVE_KV_SECRET", "valueFrom": {"secretKeyRef": {"name": "team-kv", "key": "token"}}} in env
    assert {"name": "PDSERVE_API_KEYS", "valueFrom": {"secretKeyRef": {"name": "team-api-keys", "key": "api-keys"}}} in env
    auth = only(docs, "RayService")["spec"]["rayClusterConfig"]["authOptions"]
    assert auth == {"mode": "token", "secretName": "team-ray-token"}


def test_without_a_kv_secret_value_install_generates_one_and_sets_no_api_keys():
    docs = render()
    secret = _secret_holding(docs, "kv-secret")
    assert len(base64.b64decode(secret["data"]["kv-secret"])) == 64
    env = _head_env(docs)
    assert [e["valueFrom"]["secretKeyRef"]["name"] for e in env if e["name"] == "PDSERVE_KV_SECRET"] == [
        secret["metadata"]["name"]]
    assert "PDSERVE_API_KEYS" not in {e["name"] for e in env}


def test_api_keys_from_values_become_a_secret_exposed_comma_separated():
    docs = render(VARIANTS["two_gpu_types"])
    keys = _secret_holding(docs, "api-keys")
    assert keys["stringData"]["api-keys"] == "key-a,key-b"
    assert {"name": "PDSERVE_API_KEYS",
            "valueFrom": {"secretKeyRef": {"name": keys["metadata"]["name"], "key": "api-keys"}}} in _head_env(docs)


def test_engine_args_and_config_overrides_reach_cluster_yaml():
    docs = render({"pools": {"decode": {"engineArgs": {"max_num_seqs": 64}}},
                   "clusterConfigOverrides": {"tracing": {"exporter": "otlp"}, "decode": {"max_ongoing_requests": 32}}})
    cluster = files(docs)["cluster.yaml"]
    assert cluster["decode"]["engine_args"] == {"max_num_seqs": 64}
    assert cluster["decode"]["max_ongoing_requests"] == 32 and cluster["decode"]["accelerator_type"] == "L4"
    assert cluster["tracing"] == {"exporter": "otlp"}
    assert "tool_call_parser" not in cluster  # the default model's own (pdserve's config default)
    assert files(render({"toolCallParser": "hermes"}))["cluster.yaml"]["tool_call_parser"] == "hermes"


@pytest.mark.parametrize("values", [
    {"pools": {"prefill": {"gpusPerReplica": "two"}}},
    {"pools": {"decode": {"acceleratorTpe": "L4"}}},
    {"autoscaling": {"policy": {"prefill": {"min_replicas": 3}}}},  # set by pools.prefill.minReplicas
    {"kvTransfer": {"secret": 42}},
    {"kvTransfer": {"port": 80}},
    {"networkPolicy": {"enabled": "yes"}},
    {"networkPolicy": {"clientFrom": [{"podSelectr": {}}]}},
    {"rayAuth": {"secretName": "mine"}},
    {"mode": "colocated"},
    {"mode": "adaptive", "autoscaling": {"enabled": False}, "pools": {"adaptive-L4": {"acceleratorType": "L4"}}},
    {"mode": "adaptive", "autoscaling": {"enabled": False}, "pools": {"adaptive-l4": {"acceleratorTpe": "L4"}}},
], ids=["wrong_type", "misspelt_key", "bound_in_policy", "secret_not_string", "privileged_kv_port",
        "network_policy_switch_not_boolean", "misspelt_client_peer", "misspelt_ray_auth_key", "unknown_mode",
        "adaptive_pool_name_not_lowercase", "adaptive_pool_misspelt_key"])
def test_values_schema_refuses_bad_values(values):
    with pytest.raises(helm_python.HelmValuesError):
        render(values)


def test_initial_replicas_outside_the_pool_bounds_refuse_to_render():
    with pytest.raises(helm_python.HelmRenderError, match="pools.decode.replicas"):
        render({"pools": {"decode": {"replicas": 5, "maxReplicas": 4}}})


@pytest.mark.parametrize("variant", VARIANTS)
def test_chart_passes_helm_lint_strict(variant):
    report = helm_python.lint(K8S / "chart" / "pdserve", VARIANTS[variant], strict=True, namespace=NAMESPACE)
    assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] > 1] == []


@pytest.mark.parametrize("path", sorted((K8S / "policies").glob("*.yaml")), ids=lambda p: p.name)
def test_example_policy_loads_and_names_its_schema(path):
    load_policy(path)
    assert path.read_text().startswith("# yaml-language-server: $schema=autoscaling.schema.json\n")


def test_example_policies_cover_the_common_setups():
    assert {p.name for p in (K8S / "policies").glob("*.yaml")} == {
        "h100-prefill-l4-decode.yaml", "single-gpu-type.yaml", "cpu-dev.yaml"}


def test_plain_manifests_equal_a_fresh_render_of_the_chart():
    assert (K8S / "manifests" / "pdserve.yaml").read_text() == render_manifests.plain_manifests(), \
        "k8s/manifests is stale: run .venv/bin/python k8s/render_manifests.py"


def _rayservice() -> dict:
    return only(render(), "RayService")


@pytest.mark.parametrize("breaks", [
    lambda d: d["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].__setitem__("replicas", "two"),
    lambda d: d["spec"]["rayClusterConfig"].__setitem__("workerGroupSpec", []),
    lambda d: d["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"].__setitem__("num-cpus", 4),
    lambda d: d["metadata"].__setitem__("name", "Not_A_Name"),
], ids=["wrong_type", "unknown_field", "non_string_start_param", "bad_name"])
def test_validation_refuses_a_broken_rayservice(breaks):
    doc = _rayservice()
    breaks(doc)
    with pytest.raises(jsonschema.ValidationError):
        validate(doc)


def test_validation_refuses_a_broken_builtin_manifest():
    service = only(render(), "Service")
    service["spec"]["ports"][0]["port"] = "http"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(service)
