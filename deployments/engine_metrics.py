"""The engines' own vLLM metrics (`vllm:*`), gathered from every live engine replica and served on
the ingress's /metrics next to pdserve's, each sample labelled with its `pool` and `replica`: so
vLLM's published Grafana dashboard and autoscaling rules keyed on `vllm:num_requests_waiting` or
`vllm:kv_cache_usage_perc` work unchanged, per replica or summed per pool. Pure: the caller
fetches each replica's exposition text."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

VLLM_PREFIX = "vllm:"
"""vLLM names every metric of its own with this prefix."""


def merged_families(texts: Mapping[tuple[str, str], str]) -> list[Metric]:
    """The `vllm:` families of every replica's exposition (`texts`: (pool, replica id) -> text), one
    family per name, each sample labelled with the replica's pool and id."""
    families: dict[str, Metric] = {}
    for (pool, replica), text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            if not family.name.startswith(VLLM_PREFIX):
                continue
            merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type,
                                                             family.unit))
            for s in family.samples:
                merged.add_sample(s.name, {**s.labels, "pool": pool, "replica": replica}, s.value, s.timestamp,
                                  s.exemplar)
    return list(families.values())


class _Families:
    """A Prometheus collector of fixed families."""

    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families


def render_engine_metrics(texts: Mapping[tuple[str, str], str]) -> bytes:
    """Prometheus text of the replicas' merged `vllm:` families (empty without any)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(merged_families(texts)))
    return generate_latest(registry)
