"""Pools that shrink and grow under traffic, on a whole service of real engines (two prefill and
two decode replicas, float32): each pool goes from 2 replicas to 1 and back through the Serve
actuator, the one the autoscaler uses, and the ingress replica is killed once, while requests
stream all along. Every request ends with the unbroken run's answer or a retriable error, and
the controller's ledger empties when the traffic stops. A service of its own: the scale steps
start and stop engines, which the fault tests' service should not be doing meanwhile."""

from __future__ import annotations

import threading
import time

import pytest

from pdserve.model_store import resolve_model
from tests.deployments.fault_helpers import assert_kv_idle, kill_replica, live_replicas, wait_until
from tests.deployments.service_fixtures import running_service, service_config

pytestmark = pytest.mark.slow

openai = pytest.importorskip("openai")

MAX_TOKENS = 40
REQUEST_TIMEOUT_S = 300
PROMPTS = [f"Tell the story of the {animal} who learned to sing." for animal in ("fox", "owl", "bear", "crow")]


@pytest.fixture(scope="module")
def svc():
    cfg = service_config(
        prefill={"replicas": 2}, decode={"replicas": 2}, slo={"on_unmeetable": "best_effort"},
        ingress={"route_wait_s": 30, "request_timeout_s": REQUEST_TIMEOUT_S}, external_scaler_enabled=True)
    with running_service(cfg, str(resolve_model(None)), num_cpus=6) as s:
        yield s


@pytest.fixture(scope="module")
def client(svc):
    return openai.OpenAI(base_url=f"{svc.http_url}/v1", api_key="none", max_retries=0, timeout=REQUEST_TIMEOUT_S)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def reference(client, model):
    """What each prompt streams with no fault: greedy float32 is deterministic."""
    out = {}
    for p in PROMPTS:
        r = client.completions.create(model=model, prompt=p, max_tokens=MAX_TOKENS, temperature=0,
                                      extra_body={"ignore_eos": True})
        out[p] = r.choices[0].text
    return out


class Traffic:
    """A steady stream of requests: `clients` threads, each sending the next prompt as soon as
    its last answer ends, until stopped; each outcome recorded with its duration."""

    def __init__(self, client, model: str, reference: dict[str, str], clients: int = 2):
        self.client, self.model, self.reference = client, model, reference
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
            t.join(timeout=REQUEST_TIMEOUT_S + 30)

    def _run(self, i: int) -> None:
        n = i
        while not self._stop.is_set():
            prompt = PROMPTS[n % len(PROMPTS)]
            n += 1
            start, text, finish = time.monotonic(), "", None
            try:
                for event in self.client.completions.create(model=self.model, prompt=prompt, max_tokens=MAX_TOKENS,
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


def test_pools_scaled_down_and_up_and_the_ingress_killed_under_steady_traffic_lose_no_request(
        svc, client, model, reference):
    """Each pool goes 2 -> 1 -> 2 through the Serve actuator (the autoscaler's), and the ingress
    replica is killed once, with requests streaming all along: each one ends with the unbroken
    run's answer or a retriable error within its deadline (those on the killed ingress get what
    Serve's proxy says, a 500 or a cut connection), and afterwards every instance's load in the
    controller's ledger is 0 again."""
    from pdserve.controller.autoscaling.serve_actuator import ServeActuator

    actuator = ServeActuator(svc.cfg.app_name)
    with Traffic(client, model, reference) as traffic:
        wait_until(lambda: traffic.count() >= 3, 300, "traffic to flow")
        for step, sizes in enumerate(({"decode": 1}, {"prefill": 1}, {"decode": 2, "prefill": 2})):
            before = traffic.count()
            actuator.apply(sizes)
            for pool, n in sizes.items():
                wait_until(lambda pool=pool, n=n: live_replicas(svc, pool) == n, 300, f"{pool} at {n} replicas")
            wait_until(lambda before=before: traffic.count() >= before + 3, 300, f"traffic after step {step}")
        before, killed_at = traffic.count(), time.monotonic()
        kill_replica(svc, "ingress")
        wait_until(lambda: traffic.count() >= before + 6, 300, "answers through the new ingress replica")
        answered_again_at = time.monotonic()
    kinds = {k: sum(o[0] == k for o in traffic.outcomes) for k in ("ok", "retriable", "proxy", "wrong")}
    slowest_s = max(o[1] for o in traffic.outcomes)
    print(f"scale 2->1->2 and an ingress kill: {len(traffic.outcomes)} requests, {kinds}, slowest {slowest_s:.1f} s; "
          f"retriable: {[o[2] for o in traffic.outcomes if o[0] in ('retriable', 'proxy')]}")
    assert kinds["wrong"] == 0, [o for o in traffic.outcomes if o[0] == "wrong"]
    # Serve's proxy answers 500 for requests on the ingress replica it lost, and only then.
    assert all(killed_at <= o[3] <= answered_again_at for o in traffic.outcomes if o[0] == "proxy")
    assert slowest_s < REQUEST_TIMEOUT_S + 10  # ended by its deadline at the latest (then with a 503), plus HTTP
    assert_kv_idle(svc, "scaling and an ingress kill")
