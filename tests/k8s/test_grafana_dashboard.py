"""The shipped Grafana dashboard queries only metrics that exist: pdserve's as the ingress
registers them, vLLM's as vLLM's Prometheus logger names them (and the ingress relabels)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import vllm.v1.metrics.loggers as vllm_loggers

from pdserve.deployments.metrics import IngressMetrics

DASHBOARD = Path(__file__).parents[2] / "k8s" / "grafana" / "pdserve-dashboard.json"
SAMPLE_SUFFIXES = ("_bucket", "_total", "_count", "_sum")


def _queried_metrics() -> set[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dash["panels"] for t in panel["targets"]]
    assert exprs and all(panel["datasource"]["uid"] == "${datasource}" for panel in dash["panels"])
    return {m for expr in exprs for m in re.findall(r"\b(?:pdserve_|vllm:)[a-z0-9_:]+", expr)}


def test_every_pdserve_metric_the_dashboard_queries_is_one_the_ingress_registers():
    registered = {s.name for family in IngressMetrics().registry.collect() for s in family.samples}
    registered |= {f.name for f in IngressMetrics().registry.collect()}
    queried = {m for m in _queried_metrics() if m.startswith("pdserve_")}
    assert len(queried) >= 15
    missing = {m for m in queried if m not in registered and m.removesuffix("_bucket") not in registered
               and not any(m.endswith(s) and m.removesuffix(s) in registered for s in SAMPLE_SUFFIXES)}
    assert not missing


def test_every_vllm_metric_the_dashboard_queries_is_one_vllm_defines():
    source = Path(vllm_loggers.__file__).read_text()
    queried = {m for m in _queried_metrics() if m.startswith("vllm:")}
    assert queried and all(f'"{m}"' in source for m in queried), queried
