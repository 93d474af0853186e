"""The Helm chart renders manifests that Kubernetes and KubeRay accept, carrying config that
pdserve accepts. Offline: Helm's own Go engine renders (helm_python), kubernetes-validate
checks built-in kinds strictly, the vendored KubeRay CRD checks the RayService; no cluster."""

from __future__ import annotations

import base64
import dataclasses
import functools
import importlib.util
import json
from pathlib import Path

import helm_python
import jsonschema
import kubernetes_validate
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from pdserve.config.autoscaling_policy import load_policy, parse_policy
from pdserve.config.cluster import parse_config

K8S = Path(__file__).resolve().parents[2] / "k8s"
CRD = Path(__file__).resolve().parent / "crds" / "ray.io_rayservices.yaml"
KUBERNETES_VERSION = "1.33"
NAMESPACE = "serving"

_spec = importlib.util.spec_from_file_location("render_manifests", K8S / "render_manifests.py")
render_manifests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(render_manifests)

VARIANTS = {
    "defaults": {},
    "pdserve_patches_worker_groups": {"enableInTreeAutoscaling": False},
    "two_gpu_types": {
        "pools": {"prefill": {"acceleratorType": "H100", "gpusPerReplica": 2, "replicasPerPod": 4, "replicas": 2,
                              "minReplicas": 1, "maxReplicas": 8, "nodeSelector": {"gpu": "h100"},
                              "resources": {"requests": {"cpu": "18", "memory": "256Gi"},
                                            "limits": {"memory": "256Gi"}},
                              "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
                  "decode": {"acceleratorType": "L4", "replicasPerPod": 2, "replicas": 3, "minReplicas": 2,
                             "maxReplicas": 16, "nodeSelector": {"gpu": "l4"}}},
        "autoscaling": {"policy": {"gpu_budget": 40, "gpu_cost_per_hour": {"H100": 4.0, "L4": 0.8},
                                   "decode": {"kv_usage_target": 0.9}}},
        "apiKeys": {"keys": ["key-a", "key-b"]},
    },
    "existing_secrets": {"kvTransfer": {"existingSecret": "team-kv", "existingSecretKey": "token"},
                         "apiKeys": {"existingSecret": "team-api-keys"}, "rayAuth": {"existingSecret": "team-ray-token"}},
    "autoscaling_off": {"autoscaling": {"enabled": False}},
    # Nothing calls the Kubernetes API; clients only from the gateway namespace, over mutual TLS.
    "static_pools_behind_a_gateway": {
        "enableInTreeAutoscaling": False, "autoscaling": {"enabled": False},
        "networkPolicy": {"clientFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gateway"}}}]},
        "ingress": {"grpcTls": {"existingSecret": "pdserve-grpc-tls", "requireClientCerts": True}},
    },
}


def render(values: dict | None = None) -> list[dict]:
    return [yaml.safe_load(d) for d in render_manifests.render(values, namespace=NAMESPACE)]


def only(docs: list[dict], kind: str) -> dict:
    [doc] = [d for d in docs if d["kind"] == kind]
    return doc


def files(docs: list[dict]) -> dict[str, dict]:
    """The ConfigMap's files, parsed."""
    return {name: yaml.safe_load(text) for name, text in only(docs, "ConfigMap")["data"].items()}


def pods(docs: list[dict]) -> dict[str, dict]:
    """Pod templates by group: "head" and each worker group's name."""
    cluster = only(docs, "RayService")["spec"]["rayClusterConfig"]
    return {"head": cluster["headGroupSpec"]["template"],
            **{g["groupName"]: g["template"] for g in cluster["workerGroupSpecs"]}}


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


def test_service_sends_http_and_grpc_to_the_head_pods_ports():
    docs = render()
    service, head = only(docs, "Service"), pods(docs)["head"]
    labels = head["metadata"]["labels"]
    assert {k: v for k, v in service["spec"]["selector"].items() if k != "ray.io/serve"}.items() <= labels.items()
    ports = {p["name"]: p["containerPort"] for p in head["spec"]["containers"][0]["ports"]}
    cfg = parse_config(files(docs)["cluster.yaml"])
    assert {(p["port"], ports[p["targetPort"]]) for p in service["spec"]["ports"]} == {
        (cfg.ingress.http_port, cfg.ingress.http_port), (cfg.ingress.grpc_port, cfg.ingress.grpc_port)}


def _ray_resources(group: dict) -> dict[str, float]:
    """KubeRay pastes the value into `ray start --resources=...`: single quotes keep the JSON whole."""
    value = group["rayStartParams"]["resources"]
    assert value.startswith("'") and value.endswith("'"), value
    return json.loads(value[1:-1])


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


def _secret_holding(docs: list[dict], key: str) -> dict:
    [secret] = [d for d in docs if d["kind"] == "Secret" and key in {**d.get("data", {}), **d.get("stringData", {})}]
    return secret


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


@pytest.mark.parametrize("values", [
    {"pools": {"prefill": {"gpusPerReplica": "two"}}},
    {"pools": {"decode": {"acceleratorTpe": "L4"}}},
    {"autoscaling": {"policy": {"prefill": {"min_replicas": 3}}}},  # set by pools.prefill.minReplicas
    {"kvTransfer": {"secret": 42}},
    {"kvTransfer": {"port": 80}},
    {"networkPolicy": {"enabled": "yes"}},
    {"networkPolicy": {"clientFrom": [{"podSelectr": {}}]}},
    {"rayAuth": {"secretName": "mine"}},
], ids=["wrong_type", "misspelt_key", "bound_in_policy", "secret_not_string", "privileged_kv_port",
        "network_policy_switch_not_boolean", "misspelt_client_peer", "misspelt_ray_auth_key"])
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


# Security of the rendered pods: who reaches which port (NetworkPolicies, evaluated here as
# Kubernetes does for the parts the chart writes), what runs with which rights, and where the
# credentials go.

@dataclasses.dataclass(frozen=True)
class Source:
    """Where a connection comes from: a pod (its labels and namespace) or, without labels, an
    address outside the cluster."""
    labels: tuple[tuple[str, str], ...] | None
    namespace: str = NAMESPACE

    @classmethod
    def pod(cls, labels: dict[str, str], namespace: str = NAMESPACE) -> Source:
        return cls(tuple(sorted(labels.items())), namespace)


STRANGER = Source.pod({"app": "notebook"})  # another workload of the same namespace
ELSEWHERE = Source.pod({"app": "notebook"}, namespace="team-b")
OUTSIDE = Source(None)
OPERATOR = Source.pod({"app.kubernetes.io/name": "kuberay-operator",
                       "app.kubernetes.io/component": "kuberay-operator"}, namespace="kuberay-system")
GATEWAY = Source.pod({"app": "envoy"}, namespace="gateway")
# Ray's fixed ports (GCS, metrics, dashboard, client, dashboard agent), one of its worker ports
# and one it may pick from the ephemeral range.
RAY_PORTS = [6379, 8080, 8265, 10001, 52365, 12345, 40000]


def _selects(selector: dict, labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, selector  # all the chart and these tests write
    return selector.get("matchLabels", {}).items() <= labels.items()


def _peer_admits(peer: dict, source: Source, policy_namespace: str) -> bool:
    if "ipBlock" in peer:
        return source.labels is None
    if source.labels is None:
        return False
    if "namespaceSelector" in peer:
        if not _selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": source.namespace}):
            return False
    elif source.namespace != policy_namespace:
        return False
    return _selects(peer.get("podSelector", {}), dict(source.labels))


def _port_in(ports: list[dict] | None, port: int) -> bool:
    if not ports:
        return True
    assert all(isinstance(p["port"], int) for p in ports), ports  # numbers: an endPort range needs them
    return any(p.get("protocol", "TCP") == "TCP" and p["port"] <= port <= p.get("endPort", p["port"]) for p in ports)


def admits(docs: list[dict], target: dict, source: Source, port: int) -> bool:
    """Whether the NetworkPolicies let `source` connect to TCP `port` of the pod `target` (a template)."""
    labels = target["metadata"]["labels"]
    policies = [d["spec"] for d in docs if d["kind"] == "NetworkPolicy" and "Ingress" in d["spec"]["policyTypes"]
                and _selects(d["spec"]["podSelector"], labels)]
    if not policies:
        return True  # a pod no policy selects is not isolated
    return any(_port_in(rule.get("ports"), port)
               and ("from" not in rule or any(_peer_admits(peer, source, NAMESPACE) for peer in rule["from"]))
               for policy in policies for rule in policy.get("ingress", []))


def _kv_ports(docs: list[dict]) -> range:
    cfg = parse_config(files(docs)["cluster.yaml"])
    return range(cfg.kv_receiver_port, cfg.kv_receiver_port + cfg.kv_receiver_port_count)


def _groups(docs: list[dict]) -> dict[str, dict]:
    """Pod templates by role: head, prefill, decode."""
    return {t["metadata"]["labels"]["app.kubernetes.io/component"]: t for t in pods(docs).values()}


@pytest.mark.parametrize("variant", VARIANTS)
def test_ray_ports_admit_the_clusters_own_pods_and_no_other(variant):
    docs = render(VARIANTS[variant])
    groups = _groups(docs)
    own = [Source.pod(t["metadata"]["labels"]) for t in groups.values()]
    for role, target in groups.items():
        for port in RAY_PORTS:
            assert all(admits(docs, target, source, port) for source in own), (role, port)
            assert not any(admits(docs, target, source, port) for source in (STRANGER, ELSEWHERE, OUTSIDE)), (role, port)
    # KubeRay's operator deploys the application through the head's dashboard, and nothing else of Ray.
    assert admits(docs, groups["head"], OPERATOR, 8265)
    assert not any(admits(docs, groups["head"], OPERATOR, port) for port in (6379, 10001))


@pytest.mark.parametrize("variant", VARIANTS)
def test_kv_receiver_ports_admit_only_prefill_pods(variant):
    docs = render(VARIANTS[variant])
    groups = _groups(docs)
    kv = _kv_ports(docs)
    prefill, head, decode = (Source.pod(groups[r]["metadata"]["labels"]) for r in ("prefill", "head", "decode"))
    for port in kv:
        assert admits(docs, groups["decode"], prefill, port)
        assert not any(admits(docs, groups["decode"], source, port)
                       for source in (head, decode, STRANGER, ELSEWHERE, OUTSIDE, OPERATOR)), port
    # Only those ports: the ones either side stay open to the whole cluster.
    assert admits(docs, groups["decode"], head, kv.start - 1) and admits(docs, groups["decode"], head, kv.stop)


@pytest.mark.parametrize("variant", ["defaults", "static_pools_behind_a_gateway"])
def test_client_ports_admit_anyone_by_default_and_only_client_from_when_set(variant):
    docs = render(VARIANTS[variant])
    head = _groups(docs)["head"]
    cfg = parse_config(files(docs)["cluster.yaml"])
    restricted = bool(VARIANTS[variant])
    for port in (cfg.ingress.http_port, cfg.ingress.grpc_port):
        assert admits(docs, head, GATEWAY, port)
        assert all(admits(docs, head, source, port) != restricted for source in (STRANGER, ELSEWHERE, OUTSIDE)), port
    # KubeRay checks Serve's proxy whoever the clients are.
    assert admits(docs, head, OPERATOR, cfg.ingress.http_port)


def test_network_policies_can_be_turned_off():
    docs = render({"networkPolicy": {"enabled": False}})
    assert "NetworkPolicy" not in {d["kind"] for d in docs}
    assert admits(docs, _groups(docs)["decode"], STRANGER, _kv_ports(docs).start)


@pytest.mark.parametrize("variant", ["defaults", "two_gpu_types"])
def test_decode_pods_declare_the_kv_receiver_ports_pdserve_binds(variant):
    docs = render(VARIANTS[variant])
    groups = _groups(docs)
    per_pod = (VARIANTS[variant].get("pools", {}).get("decode", {})).get("replicasPerPod", 1)
    kv = _kv_ports(docs)
    assert (kv.start, len(kv)) == (5600, per_pod)  # one receiver per decode replica of a pod
    ports = groups["decode"]["spec"]["containers"][0]["ports"]
    assert {p["containerPort"]: p["name"] for p in ports} == {port: "kv" if i == 0 else f"kv-{i}"
                                                             for i, port in enumerate(kv)}
    for template in groups.values():
        names = [p["name"] for p in template["spec"]["containers"][0].get("ports", [])]
        assert len(set(names)) == len(names) and all(len(n) <= 15 for n in names)


@pytest.mark.parametrize("values", [
    {"kvTransfer": {"port": 6378}, "pools": {"decode": {"replicasPerPod": 2}}},  # GCS
    {"kvTransfer": {"port": 9999}, "pools": {"decode": {"replicasPerPod": 4}}},  # Ray's worker ports
    {"kvTransfer": {"port": 50050}, "pools": {"decode": {"replicasPerPod": 2}}},  # the gRPC ingress
], ids=["gcs", "ray_worker_ports", "grpc_ingress"])
def test_kv_receiver_ports_clashing_with_ray_or_ingress_ports_refuse_to_render(values):
    with pytest.raises(helm_python.HelmRenderError, match="KV receiver ports"):
        render(values)


def _containers(docs: list[dict]) -> list[tuple[str, dict, dict]]:
    """(where, pod spec, container) for every container the RayService's pods run that the chart
    describes: each group's Ray container and, with the in-tree autoscaler, KubeRay's sidecar."""
    cluster = only(docs, "RayService")["spec"]["rayClusterConfig"]
    out = [(f"{group}/{c['name']}", t["spec"], c) for group, t in pods(docs).items()
           for c in t["spec"]["containers"] + t["spec"].get("initContainers", [])]
    if cluster["enableInTreeAutoscaling"]:
        out.append(("head/autoscaler", pods(docs)["head"]["spec"], cluster["autoscalerOptions"]))
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_container_runs_non_root_unprivileged_under_the_runtime_default_seccomp_profile(variant):
    for where, pod, container in _containers(render(VARIANTS[variant])):
        own, inherited = container.get("securityContext", {}), pod.get("securityContext", {})
        effective = {**inherited, **own}
        assert effective.get("runAsNonRoot") is True and effective.get("runAsUser", 1) != 0, where
        assert own.get("allowPrivilegeEscalation") is False, where
        assert "ALL" in own.get("capabilities", {}).get("drop", []) and not own["capabilities"].get("add"), where
        assert effective.get("seccompProfile") == {"type": "RuntimeDefault"}, where
        assert own.get("readOnlyRootFilesystem") is True and not own.get("privileged"), where


@pytest.mark.parametrize("variant", VARIANTS)
def test_with_a_read_only_root_ray_and_vllm_write_to_empty_dirs(variant):
    for where, pod, container in _containers(render(VARIANTS[variant])):
        if where == "head/autoscaler":
            continue  # KubeRay mounts /tmp/ray into it too
        volumes = {v["name"]: v for v in pod["volumes"]}
        writable = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]
                    if not m.get("readOnly") and "emptyDir" in volumes[m["name"]]}
        # Ray's session dir lives in /tmp/ray; its object store in /dev/shm, which must be memory.
        assert "/tmp" in writable and writable["/dev/shm"]["emptyDir"] == {"medium": "Memory"}, where
        # Every cache path the chart points a library at lies in a writable emptyDir.
        paths = [e["value"] for e in container["env"] if e.get("value", "").startswith("/")]
        assert {e["name"] for e in container["env"]} >= {"XDG_CACHE_HOME", "XDG_CONFIG_HOME", "TRITON_HOME"}, where
        assert all(any(path == m or path.startswith(m + "/") for m in writable) for path in paths), (where, paths)


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_service_account_token_is_mounted_only_on_the_head_and_only_where_something_calls_the_api(variant):
    values = VARIANTS[variant]
    docs = render(values)
    templates = pods(docs)
    head = templates.pop("head")["spec"]
    for group, template in templates.items():
        assert template["spec"].get("automountServiceAccountToken") is False, group
        assert "serviceAccountName" not in template["spec"], group
    in_tree = values.get("enableInTreeAutoscaling", True)
    patching = not in_tree and values.get("autoscaling", {}).get("enabled", True)
    if patching:  # pdserve's controller patches the RayService with the chart's account
        assert head["serviceAccountName"] == only(docs, "ServiceAccount")["metadata"]["name"]
        assert head.get("automountServiceAccountToken", True) is True
    elif in_tree:  # KubeRay's autoscaler sidecar, with the account KubeRay gives the head
        assert "serviceAccountName" not in head and head.get("automountServiceAccountToken", True) is True
    else:
        assert head.get("automountServiceAccountToken") is False


@pytest.mark.parametrize("variant", ["pdserve_patches_worker_groups", "defaults"])
def test_the_controller_holding_the_patch_token_is_pinned_to_the_head(variant, monkeypatch):
    docs = render(VARIANTS[variant])
    cluster = only(docs, "RayService")["spec"]["rayClusterConfig"]
    serve = ServeDeploySchema.model_validate(yaml.safe_load(only(docs, "RayService")["spec"]["serveConfigV2"]))
    overrides = {d.name: d for d in serve.applications[0].deployments}
    if variant == "defaults":
        assert not overrides and "pdserve_controller" not in _ray_resources(cluster["headGroupSpec"])
        return
    pinned = overrides["controller"].ray_actor_options.model_dump(exclude_unset=True)
    assert pinned["resources"] == {"pdserve_controller": 1}
    assert _ray_resources(cluster["headGroupSpec"])["pdserve_controller"] == 1
    assert all("pdserve_controller" not in _ray_resources(g) for g in cluster["workerGroupSpecs"])
    # Serve replaces the code's ray_actor_options with the config's: they must be pdserve's own plus the pin.
    from pdserve.deployments import app as pdserve_app

    monkeypatch.setattr(pdserve_app, "kv_bytes_per_token", lambda *_: 1)  # reads the checkpoint otherwise
    cfg = parse_config(files(docs)["cluster.yaml"]).model_copy(update={"autoscaling": None})  # no policy file here
    ingress = pdserve_app.build_app(cfg, "/model")._bound_deployment
    [controller] = [a._bound_deployment for a in ingress.init_args if hasattr(a, "_bound_deployment")]
    assert controller.name == "controller"
    assert {k: v for k, v in pinned.items() if k != "resources"} == controller.ray_actor_options


def _secret_refs(spec: dict, container: dict) -> set[str]:
    """What of the pod's Secrets the container sees: env vars from Secrets and mounted Secret volumes."""
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert not container.get("envFrom")
    return ({e["name"] for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})}
            | {f"volume:{volumes[m['name']]['secret']['secretName']}" for m in container["volumeMounts"]
               if "secret" in volumes[m["name"]]})


@pytest.mark.parametrize("variant", VARIANTS)
def test_secrets_reach_only_the_head_whose_processes_read_them(variant):
    values = VARIANTS[variant]
    docs = render(values)
    seen = {group: _secret_refs(t["spec"], t["spec"]["containers"][0]) for group, t in pods(docs).items()}
    # The application build reads the KV secret (and hands it to the engines); the ingress the API keys and its TLS files.
    expected = {"PDSERVE_KV_SECRET"}
    if values.get("apiKeys"):
        expected.add("PDSERVE_API_KEYS")
    if tls := values.get("ingress", {}).get("grpcTls", {}).get("existingSecret"):
        expected.add(f"volume:{tls}")
    assert seen.pop("head") == expected
    assert all(refs == set() for refs in seen.values()), seen


@pytest.mark.parametrize("variant", VARIANTS)
def test_ray_token_authentication_is_on_with_a_token_kept_in_a_secret(variant):
    docs = render(VARIANTS[variant])
    auth = only(docs, "RayService")["spec"]["rayClusterConfig"]["authOptions"]
    assert auth["mode"] == "token"  # KubeRay sets RAY_AUTH_MODE and RAY_AUTH_TOKEN on every Ray container
    if variant == "existing_secrets":
        assert auth["secretName"] == "team-ray-token"
        return
    token = _secret_holding(docs, "auth_token")  # the key KubeRay reads
    assert token["metadata"]["name"] == auth["secretName"]
    assert len(base64.b64decode(token["data"]["auth_token"])) == 64


def test_ray_token_authentication_refuses_a_ray_version_without_it():
    with pytest.raises(helm_python.HelmRenderError, match="rayAuth needs Ray 2.52.0"):
        render({"rayVersion": "2.51.0"})
    assert "authOptions" not in only(render({"rayVersion": "2.51.0", "rayAuth": {"enabled": False}}),
                                     "RayService")["spec"]["rayClusterConfig"]


@pytest.mark.parametrize("client_certs", [True, False])
def test_grpc_tls_files_are_mounted_read_only_on_the_head_and_named_in_cluster_yaml(client_certs):
    docs = render({"ingress": {"grpcTls": {"existingSecret": "pdserve-grpc-tls", "requireClientCerts": client_certs}}})
    head = pods(docs)["head"]["spec"]
    [volume] = [v for v in head["volumes"] if "secret" in v]
    [mount] = [m for m in head["containers"][0]["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["readOnly"] is True and volume["secret"]["secretName"] == "pdserve-grpc-tls"
    mounted = {f"{mount['mountPath']}/{item['path']}": item["key"] for item in volume["secret"]["items"]}
    ingress = parse_config(files(docs)["cluster.yaml"]).ingress
    assert mounted[str(ingress.grpc_tls_cert_file)] == "tls.crt" and mounted[str(ingress.grpc_tls_key_file)] == "tls.key"
    if client_certs:
        assert mounted[str(ingress.grpc_tls_client_ca_file)] == "ca.crt"
    else:
        assert ingress.grpc_tls_client_ca_file is None and len(mounted) == 2
