"""What the fault and scaling tests on a whole service share: waiting for a condition, the
controller's view of the instances, killing a replica as a crash would, and checking that every
engine is idle again."""

from __future__ import annotations

import time


def wait_until(check, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def snapshot(svc) -> list[dict]:
    from ray import serve

    return serve.get_deployment_handle("controller", svc.cfg.app_name).snapshot.remote().result()


def live_replicas(svc, pool: str) -> int:
    return sum(i["pool"] == pool and i["live"] for i in snapshot(svc))


def wait_for_full_pools(svc, replicas: dict[str, int]) -> None:
    """A kill test starts with every replica live: a replica killed by the test before is
    replaced by Serve, but its engine takes a minute or more to start, and killing the only
    live one of a pool leaves a retry nowhere to go."""
    for pool, n in replicas.items():
        wait_until(lambda pool=pool, n=n: live_replicas(svc, pool) == n, 300, f"{n} live {pool} replicas")


def kill_replica(svc, deployment: str, replica_id: str = "") -> None:
    """Kill a replica's actor, as a crashed process or a lost node would; Serve starts a new one."""
    import ray

    prefix = f"SERVE_REPLICA::{svc.cfg.app_name}#{deployment}#{replica_id}"
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
    assert names, f"no actor named {prefix}*"
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)


def assert_kv_idle(svc, scenario: str) -> None:
    """Every live engine has all its KV blocks free again (after its latest report)."""
    def idle() -> bool:
        engines = [i for i in snapshot(svc) if i["live"] and i["total_kv_blocks"]]
        return bool(engines) and all(i["free_kv_blocks"] == i["total_kv_blocks"] and i["load"] == 0 for i in engines)

    wait_until(idle, 60, f"free KV blocks back to idle after {scenario}")
    print(f"{scenario}: " + ", ".join(f"{i['pool']} {i['replica_id']}: {i['free_kv_blocks']}/{i['total_kv_blocks']} "
                                      "blocks free" for i in snapshot(svc) if i["live"]))
