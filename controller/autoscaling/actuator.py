"""Where a sizing decision takes effect: one small interface, one implementation per
platform (Ray Serve deployments, KubeRay worker groups), a fake in tests."""

from __future__ import annotations

from abc import ABC, abstractmethod


class Actuator(ABC):
    """The autoscaler calls `current` before each decision and `apply` after it, from one
    task, so implementations need no locking. Both may block (they talk to a cluster)."""

    @abstractmethod
    def current(self) -> dict[str, int]:
        """Replicas per pool ("prefill", "decode") that this platform targets now."""

    @abstractmethod
    def apply(self, replicas: dict[str, int]) -> None:
        """Make the platform target `replicas` per pool; pools not named stay as they are."""
