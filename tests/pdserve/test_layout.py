"""The package seen by Python and by tools that read files (import-linter's grimp) is the same,
and `pdserve.<part>` is the top-level folder `<part>/` (README, "Layout")."""

import importlib.util
import pkgutil
from pathlib import Path

import grimp

import pdserve

ROOT = Path(__file__).resolve().parents[2]
PARTS = ["proto", "kvtransfer", "experts", "controller", "prefill", "decode", "deployments", "bench"]


def test_python_and_the_import_graph_from_files_see_the_same_modules():
    imported = {"pdserve"} | {m.name for m in pkgutil.walk_packages(pdserve.__path__, "pdserve.")}
    graph = grimp.build_graph("pdserve", cache_dir=None)
    assert graph.modules == imported
    assert {f"pdserve.{part}" for part in PARTS} <= graph.modules


def test_each_part_resolves_to_its_top_level_folder():
    for part, module, file in [("kvtransfer", "connector", "connector.py"), ("proto", "kvtransfer_pb2", "kvtransfer_pb2.py"),
                               ("controller", "autoscaling", "autoscaling/__init__.py")]:
        spec = importlib.util.find_spec(f"pdserve.{part}.{module}")
        assert spec is not None and Path(spec.origin).resolve() == ROOT / part / file
    assert Path(pdserve.__file__).resolve().parent == ROOT / "pdserve"
