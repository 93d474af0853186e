"""The cluster configs the README's benchmark commands name are valid configs."""

from pathlib import Path

import pytest

from pdserve.config.cluster import load_config

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.mark.parametrize("path", sorted(BENCH.glob("*.yaml")), ids=lambda p: p.name)
def test_each_benchmark_config_loads(path):
    assert load_config(str(path)).dtype == "float32"  # each measures the CPU engines in float32
