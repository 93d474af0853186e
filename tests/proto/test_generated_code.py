"""The committed protobuf modules are what protoc makes from the committed .proto."""

import subprocess
import sys
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parents[2] / "proto"


def test_generated_modules_match_the_proto(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_DIR}", f"--python_out={tmp_path}",
         f"--pyi_out={tmp_path}", str(PROTO_DIR / "kvtransfer.proto")],
        check=True,
    )
    for name in ("kvtransfer_pb2.py", "kvtransfer_pb2.pyi"):
        assert (tmp_path / name).read_text() == (PROTO_DIR / name).read_text(), f"run `make proto`: {name} is stale"
