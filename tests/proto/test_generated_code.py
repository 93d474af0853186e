"""The committed protobuf modules are what protoc makes from the committed .proto files."""

import subprocess
import sys
from pathlib import Path

import pytest

PROTO_DIR = Path(__file__).resolve().parents[2] / "proto"
PROTOS = sorted(p.name for p in PROTO_DIR.glob("*.proto"))


def test_the_known_protos_are_checked():
    assert {"kvtransfer.proto", "pdserve.proto"} <= set(PROTOS)


@pytest.mark.parametrize("proto", PROTOS)
def test_generated_modules_match_the_proto(proto, tmp_path):
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_DIR}", f"--python_out={tmp_path}",
         f"--pyi_out={tmp_path}", str(PROTO_DIR / proto)],
        check=True,
    )
    stem = proto.removesuffix(".proto")
    for name in (f"{stem}_pb2.py", f"{stem}_pb2.pyi"):
        committed = PROTO_DIR / name
        assert committed.exists(), f"run `make proto`: {name} is missing"
        assert (tmp_path / name).read_text() == committed.read_text(), f"run `make proto`: {name} is stale"
