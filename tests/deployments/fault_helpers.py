"""What the e2e tests on a whole service share: waiting for a condition, the
controller's view of the instances, killing a replica as a crash would, checking that every
engine is idle again, and steady traffic whose every outcome is recorded."""

from __future__ import annotations

import threading
import time

import openai


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


class Traffic:
    """A steady stream of requests: `clients` threads, each sending the next of `reference`'s prompts
    as soon as its last answer ends, until stopped; each outcome recorded with its duration."""

    def __init__(self, client, model: str, reference: dict[str, str], max_tokens: int, clients: int = 2):
        self.client, self.model, self.reference, self.max_tokens = client, model, reference, max_tokens
        self._prompts = list(reference)
        self.outcomes: list[tuple[str, float, str, float]] = []
        """(kind, seconds, detail, ended at): kind "ok" (the unbroken run's answer), "retriable" (429
        or 503 with Retry-After, or the connection cut by a dying ingress), "proxy" (Serve's proxy
        answering 500 without pdserve's error body: its ingress replica died under the request), or
        "wrong"."""
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]

    def __enter__(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=self.client.timeout + 30)

    def _run(self, i: int) -> None:
        n = i
        while not self._stop.is_set():
            prompt = self._prompts[n % len(self._prompts)]
            n += 1
            start, text, finish = time.monotonic(), "", None
            try:
                for event in self.client.completions.create(model=self.model, prompt=prompt, max_tokens=self.max_tokens,
                                                            temperature=0, stream=True,
                                                            extra_body={"ignore_eos": True}):
                    text += event.choices[0].text
                    finish = event.choices[0].finish_reason or finish
                kind, detail = ("ok", "") if (text, finish) == (self.reference[prompt], "length") else (
                    "wrong", f"{finish}: {text!r}")
            except openai.APIStatusError as err:
                retriable = err.status_code in (429, 503) and "retry-after" in err.response.headers
                from_proxy = err.status_code == 500 and not isinstance(err.body, dict)
                kind = "retriable" if retriable else "proxy" if from_proxy else "wrong"
                detail = f"{err.status_code}: {err.message}"
            except openai.APIConnectionError as err:
                kind, detail = "retriable", f"connection: {err!r}"
            self.outcomes.append((kind, time.monotonic() - start, detail, time.monotonic()))

    def count(self, kind: str = "ok") -> int:
        return sum(o[0] == kind for o in self.outcomes)
