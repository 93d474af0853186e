"""Security of the rendered pods: who reaches which port (NetworkPolicies, evaluated here as
Kubernetes does for the parts the chart writes, including the KV receiver ports),
what runs with which rights (security contexts, service account tokens), and where the
credentials go (Secrets, Ray's token authentication, the gRPC ingress's TLS files). Offline, as
test_chart: the chart rendered by chart_render; no cluster."""

from __future__ import annotations

import base64
import dataclasses

import helm_python
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from pdserve.config.cluster import parse_config
from tests.k8s.chart_render import (
    NAMESPACE,
    VARIANTS,
    _ray_resources,
    _secret_holding,
    files,
    kv_roles,
    only,
    pods,
    render,
)


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
    """Pod templates by role: head, and prefill and decode, or the adaptive pools."""
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
def test_kv_receiver_ports_admit_only_the_pods_that_send_kv(variant):
    docs = render(VARIANTS[variant])
    groups = _groups(docs)
    kv = _kv_ports(docs)
    senders, receivers = kv_roles(VARIANTS[variant])
    head = Source.pod(groups["head"]["metadata"]["labels"])
    sending = [Source.pod(groups[role]["metadata"]["labels"]) for role in senders]
    others = [Source.pod(t["metadata"]["labels"]) for role, t in groups.items() if role not in ("head", *senders)]
    for receiver, port in ((groups[role], port) for role in receivers for port in kv):
        assert all(admits(docs, receiver, sender, port) for sender in sending)
        assert not any(admits(docs, receiver, source, port)
                       for source in (head, *others, STRANGER, ELSEWHERE, OUTSIDE, OPERATOR)), port
        # Only those ports: the ones either side stay open to the whole cluster.
        assert admits(docs, receiver, head, kv.start - 1) and admits(docs, receiver, head, kv.stop)


@pytest.mark.parametrize("variant", ["defaults", "static_pools_behind_a_gateway"])
def test_client_ports_admit_anyone_by_default_and_only_client_from_when_set(variant):
    docs = render(VARIANTS[variant])
    head = _groups(docs)["head"]
    cfg = parse_config(files(docs)["cluster.yaml"])
    restricted = bool(VARIANTS[variant])
    for port in (cfg.ingress.http_port, cfg.ingress.grpc_port, cfg.ingress.direct_http_port):
        assert admits(docs, head, GATEWAY, port)
        assert all(admits(docs, head, source, port) != restricted for source in (STRANGER, ELSEWHERE, OUTSIDE)), port
    # KubeRay checks Serve's proxy whoever the clients are.
    assert admits(docs, head, OPERATOR, cfg.ingress.http_port)


def test_network_policies_can_be_turned_off():
    docs = render({"networkPolicy": {"enabled": False}})
    assert "NetworkPolicy" not in {d["kind"] for d in docs}
    assert admits(docs, _groups(docs)["decode"], STRANGER, _kv_ports(docs).start)


@pytest.mark.parametrize("variant", ["defaults", "two_gpu_types", "adaptive", "two_adaptive_pools", "tensor_parallel"])
def test_receiving_pods_declare_the_kv_receiver_ports_pdserve_binds(variant):
    docs = render(VARIANTS[variant])
    groups = _groups(docs)
    _, receivers = kv_roles(VARIANTS[variant])
    pools = VARIANTS[variant].get("pools", {})

    def ports_per_pod(role: str) -> int:
        pool = {**pools.get("adaptive", {}), **pools.get(role, {})}
        return pool.get("replicasPerPod", 1) * pool.get("engineArgs", {}).get("tensor_parallel_size", 1)

    kv = _kv_ports(docs)
    # One receiver per TP rank of each receiving replica of a pod (of the most).
    assert (kv.start, len(kv)) == (5600, max(ports_per_pod(r) for r in receivers))
    for role in receivers:
        ports = groups[role]["spec"]["containers"][0]["ports"]
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
