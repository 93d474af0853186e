"""The Ray Serve actuator on a real local Ray cluster: the autoscaler's decisions under a
load step up and down set both pools' replica counts, through Serve's external-scaler API.
The pools here are light deployments named like pdserve's (the sizing does not depend on
what a replica runs); the engines' own scaling is in tests/deployments."""

from __future__ import annotations

import time

import pytest

from pdserve.config.autoscaling_policy import parse_policy
from pdserve.controller.autoscaling.loop import Autoscaler, RateWindow
from pdserve.controller.autoscaling.serve_actuator import ServeActuator
from pdserve.controller.registry import Registry
from tests.deployments.service_fixtures import init_ray

pytestmark = pytest.mark.slow

APP = "autoscale-test"


def running_replicas(app: str) -> dict[str, int]:
    from ray import serve
    from ray.serve._private.common import ReplicaState

    deployments = serve.status().applications[app].deployments
    return {name: deployments[name].replica_states.get(ReplicaState.RUNNING, 0) for name in ("prefill", "decode")}


def wait_for(app: str, want: dict[str, int], timeout_s: float = 60.0) -> dict[str, int]:
    deadline = time.monotonic() + timeout_s
    while (got := running_replicas(app)) != want and time.monotonic() < deadline:
        time.sleep(0.5)
    return got


@pytest.fixture(scope="module")
def serve_app():
    import ray
    from ray import serve

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Pool:
        def __call__(self) -> str:
            return "ok"

    init_ray(num_cpus=2)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": 0})
        prefill, decode = Pool.options(name="prefill").bind(), Pool.options(name="decode").bind()
        serve.run(serve.deployment(_Both, ray_actor_options={"num_cpus": 0}).bind(prefill, decode), name=APP,
                  route_prefix=None, external_scaler_enabled=True)
        yield
    finally:
        serve.shutdown()
        ray.shutdown()


class _Both:
    """An ingress holding both pools, as pdserve's does."""

    def __init__(self, prefill, decode):
        self.pools = (prefill, decode)


async def test_pools_follow_the_decisions_up_under_load_and_back_down(serve_app):
    policy = parse_policy({
        "interval_s": 1, "window_s": 10,
        "prefill": {"min_replicas": 1, "max_replicas": 3, "upscale_delay_s": 0, "downscale_delay_s": 0, "ttft_ms": 2000},
        "decode": {"min_replicas": 1, "max_replicas": 3, "upscale_delay_s": 0, "downscale_delay_s": 0, "tpot_ms": 200},
    })
    actuator = ServeActuator(APP)
    autoscaler = Autoscaler(policy, [actuator])
    registry, window = Registry({"default": policy.prefill.profile}), RateWindow(10.0, started_s=0.0)
    assert actuator.current() == {"prefill": 1, "decode": 1}

    for i in range(40):  # 4 req/s of 500-token prompts for 10 s, each answered with 300 tokens
        window.arrived(100.0 + i / 4, 500)
        window.finished(100.0 + i / 4, 300)
    up = await autoscaler.step(registry, window, now_s=110.0)
    assert up.replicas() == {"prefill": 3, "decode": 3}, up.reasons()
    assert actuator.current() == {"prefill": 3, "decode": 3}
    assert wait_for(APP, {"prefill": 3, "decode": 3}) == {"prefill": 3, "decode": 3}

    down = await autoscaler.step(registry, window, now_s=200.0)  # the window has emptied: no load
    assert down.replicas() == {"prefill": 1, "decode": 1}, down.reasons()
    assert wait_for(APP, {"prefill": 1, "decode": 1}) == {"prefill": 1, "decode": 1}


def test_an_unknown_application_is_a_clear_error(serve_app):
    with pytest.raises(RuntimeError, match="'nope' is not running"):
        ServeActuator("nope").current()
