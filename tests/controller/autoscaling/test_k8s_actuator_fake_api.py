"""KubernetesActuator against a FAKE Kubernetes API: kmock's in-memory server on 127.0.0.1,
spoken to by the official client over HTTP. kmock stores and patches objects (JSON patch
included) but runs no controllers and no admission, so this checks what we send and what
it does to the stored objects, not what KubeRay makes of it.

The client is blocking and kmock serves on the test's event loop: actuator calls go through
`asyncio.to_thread`.
"""

import asyncio
import copy
import logging

import kmock as kmock_lib
import pytest
from kubernetes.client import ApiClient, Configuration

from pdserve.config.autoscaling import KubernetesTarget
from pdserve.controller.autoscaling.k8s_actuator import JSON_PATCH, KubernetesActuator, KubernetesActuatorError

NS, NAME = "llm", "pd"
RS = "ray.io/v1/rayservices"
OBJ_PATH = f"/apis/ray.io/v1/namespaces/{NS}/rayservices/{NAME}"
TOKEN = "s3cret-bearer-token"
run = asyncio.to_thread


def rayservice(name, decode_max=8):
    """A RayService shaped like k8s/'s: head group, 3 worker groups, only 2 of them ours."""
    group = lambda name, replicas, gpu, **bounds: {  # noqa: E731
        "groupName": name, "replicas": replicas, **bounds, "rayStartParams": {},
        "template": {"spec": {"containers": [{"name": "ray-worker", "image": "pdserve:0.1",
                                              "resources": {"limits": {"nvidia.com/gpu": gpu}}}]}}}
    return {
        "apiVersion": "ray.io/v1", "kind": "RayService",
        "metadata": {"name": name, "namespace": NS, "labels": {"app": "pdserve"}, "resourceVersion": "41"},
        "spec": {
            "serveConfigV2": "applications:\n- name: pdserve\n  import_path: pdserve.deployments.app:app\n",
            "rayClusterConfig": {
                "rayVersion": "2.60.0",
                "headGroupSpec": {"rayStartParams": {"num-cpus": "0"}, "template": {"spec": {"containers": []}}},
                "workerGroupSpecs": [
                    group("h100-prefill", 1, 8, minReplicas=1, maxReplicas=6),
                    group("cpu-tools", 2, 0),
                    group("l4-decode", 1, 1, minReplicas=0, maxReplicas=decode_max),
                ],
            },
        },
        "status": {"serviceStatus": "Running"},
    }


CONFIGMAP = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "policy", "namespace": NS},
             "data": {"policy.yaml": "interval_s: 10\n"}}


@pytest.fixture
def seeded(kmock):
    """Our RayService, an unrelated one with the same group names, and a ConfigMap; seeded
    directly into kmock's store so that the request log holds only the actuator's traffic."""
    kmock.objects[RS, NS, NAME] = rayservice(NAME)
    kmock.objects[RS, NS, "other"] = rayservice("other")
    kmock.objects["v1/configmaps", NS, "policy"] = CONFIGMAP
    return kmock


@pytest.fixture
def api_client(kmock):
    config = Configuration(host=str(kmock.url).rstrip("/"), api_key={"authorization": TOKEN},
                           api_key_prefix={"authorization": "Bearer"})
    client = ApiClient(config)
    yield client
    client.close()


def actuator(api_client, **over):
    target = KubernetesTarget(**{"namespace": NS, "rayservice": NAME, "in_cluster": False,
                                 "worker_groups": {"prefill": "h100-prefill", "decode": "l4-decode"}, **over})
    return KubernetesActuator(target, api_client)


def stored(kmock, name=NAME, resource=RS):
    return copy.deepcopy(kmock.objects[resource, NS, name].raw)


def replicas(obj):
    return {g["groupName"]: g.get("replicas") for g in obj["spec"]["rayClusterConfig"]["workerGroupSpecs"]}


def masked(obj, groups=("h100-prefill", "l4-decode")):
    obj = copy.deepcopy(obj)
    for g in obj["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        if g["groupName"] in groups:
            g["replicas"] = "<masked>"
    return obj


def patches(kmock):
    return [r for r in kmock if r.method == "PATCH"]


async def test_apply_patches_only_the_configured_groups_replicas(seeded, api_client, caplog):
    before, other, cm = stored(seeded), stored(seeded, "other"), stored(seeded, "policy", "v1/configmaps")
    caplog.set_level(logging.INFO, logger="pdserve.autoscale")

    await run(actuator(api_client).apply, {"prefill": 2, "decode": 3})

    after = stored(seeded)
    assert replicas(after) == {"h100-prefill": 2, "cpu-tools": 2, "l4-decode": 3}
    assert masked(after) == masked(before)
    assert stored(seeded, "other") == other and stored(seeded, "policy", "v1/configmaps") == cm
    # RBAC is get/patch on this one name: every request is for its URL, one GET and one PATCH.
    assert [(r.method, r.url.path) for r in seeded] == [("GET", OBJ_PATH), ("PATCH", OBJ_PATH)]
    (patch,) = patches(seeded)
    assert patch.headers["Content-Type"] == JSON_PATCH
    groups = "/spec/rayClusterConfig/workerGroupSpecs"
    assert patch.data == [
        {"op": "test", "path": f"{groups}/0/groupName", "value": "h100-prefill"},
        {"op": "replace", "path": f"{groups}/0/replicas", "value": 2},
        {"op": "test", "path": f"{groups}/2/groupName", "value": "l4-decode"},
        {"op": "replace", "path": f"{groups}/2/replicas", "value": 3},
    ]
    assert caplog.messages == [
        f"kubernetes: rayservice {NS}/{NAME} group h100-prefill replicas 1 -> 2 (prefill: 2 serve replicas, 1 per pod)",
        f"kubernetes: rayservice {NS}/{NAME} group l4-decode replicas 1 -> 3 (decode: 3 serve replicas, 1 per pod)",
    ]


async def test_replicas_per_pod_rounds_up_and_current_round_trips(seeded, api_client):
    act = actuator(api_client, replicas_per_pod={"decode": 4})
    await run(act.apply, {"decode": 5})  # 5 serve replicas need 2 pods of 4
    assert replicas(stored(seeded))["l4-decode"] == 2
    assert replicas(stored(seeded))["h100-prefill"] == 1  # a pool not named stays as it is
    assert await run(act.current) == {"prefill": 1, "decode": 8}

    await run(act.apply, {"prefill": 3, "decode": 8})
    assert await run(act.current) == {"prefill": 3, "decode": 8}
    assert replicas(stored(seeded)) == {"h100-prefill": 3, "cpu-tools": 2, "l4-decode": 2}


async def test_no_patch_when_nothing_changes(seeded, api_client):
    act = actuator(api_client, replicas_per_pod={"decode": 4})
    await run(act.apply, {"prefill": 1, "decode": 3})  # decode: ceil(3/4) = 1 pod, as it is
    await run(act.apply, await run(act.current))
    await run(act.apply, {})
    assert patches(seeded) == []
    assert [r.method for r in seeded] == ["GET"] * 4  # 3 applies with nothing to write + 1 current
    assert replicas(stored(seeded)) == {"h100-prefill": 1, "cpu-tools": 2, "l4-decode": 1}


async def test_clamps_to_the_groups_bounds_and_warns(seeded, api_client, caplog):
    caplog.set_level(logging.WARNING, logger="pdserve.autoscale")
    await run(actuator(api_client).apply, {"prefill": 0, "decode": 11})
    assert replicas(stored(seeded)) == {"h100-prefill": 1, "cpu-tools": 2, "l4-decode": 8}
    text = "\n".join(caplog.messages)
    assert "group l4-decode wants 11 pods, clamped to 8 (minReplicas 0, maxReplicas 8)" in text
    assert "group h100-prefill wants 0 pods, clamped to 1 (minReplicas 1, maxReplicas 6)" in text


async def test_missing_group_is_a_clear_error(seeded, api_client):
    act = actuator(api_client, worker_groups={"prefill": "h100-prefill", "decode": "a10-decode"})
    with pytest.raises(KubernetesActuatorError, match=rf"rayservice {NS}/{NAME} has no worker group 'a10-decode'"):
        await run(act.apply, {"prefill": 4})
    with pytest.raises(KubernetesActuatorError, match="a10-decode"):
        await run(act.current)
    assert patches(seeded) == []


async def test_reordered_groups_fail_the_patch_instead_of_resizing_another_group(seeded, api_client, caplog):
    """The actuator reads the old order; someone swaps groups 0 and 2 before its patch lands."""
    caplog.set_level(logging.INFO, logger="pdserve.autoscale")
    stale = stored(seeded)
    seeded["get", kmock_lib.path(OBJ_PATH)] << stale
    now = seeded.objects[RS, NS, NAME]
    specs = now["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    now["spec"] = {**now["spec"], "rayClusterConfig": {**now["spec"]["rayClusterConfig"],
                                                         "workerGroupSpecs": specs[::-1]}}
    reordered = stored(seeded)

    with pytest.raises(KubernetesActuatorError, match=rf"patch rayservice {NS}/{NAME} failed"):
        await run(actuator(api_client).apply, {"decode": 5})
    assert len(patches(seeded)) == 1
    assert stored(seeded) == reordered  # the guard held: nothing was resized
    assert not any("->" in m for m in caplog.messages)  # and no resize was logged


async def test_api_errors_name_object_and_verb_without_the_token(seeded, api_client):
    act = actuator(api_client, rayservice="absent")
    with pytest.raises(KubernetesActuatorError, match=rf"get rayservice {NS}/absent failed: HTTP 404") as info:
        await run(act.current)
    assert TOKEN not in str(info.value)

    seeded["patch", kmock_lib.path(OBJ_PATH)] << kmock_lib.KubernetesError(
        status=403, reason="Forbidden",
        message=f'rayservices.ray.io "{NAME}" is forbidden: cannot patch resource "rayservices"')
    with pytest.raises(KubernetesActuatorError, match=rf"patch rayservice {NS}/{NAME} failed: HTTP 403") as info:
        await run(actuator(api_client).apply, {"decode": 2})
    assert "cannot patch" in str(info.value)
    assert TOKEN not in str(info.value)
    assert all(r.headers["Authorization"] == f"Bearer {TOKEN}" for r in seeded)  # it was sent, yet not echoed
