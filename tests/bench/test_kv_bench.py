"""`pdserve bench kv --json` runs end to end and its last line is the documented JSON report."""

import json

from pdserve.cli.main import main


def test_bench_kv_json_last_line_has_grpc_same_node_nixl_tcp_and_ratio_per_size(capsys):
    assert main(["bench", "kv", "--json", "--no-engines", "--sizes", "1,2", "--repeats", "1", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [s["size_mib"] for s in report["sizes"]] == [1, 2]
    for s in report["sizes"]:
        assert s["grpc_mib_s"] > 0 and s["tcp_mib_s"] > 0 and s["grpcio_raw_mib_s"] > 0 and s["same_node_mib_s"] > 0
        assert s["same_node_fresh_mib_s"] > 0 and s["nixl_mib_s"] > 0  # NIXL's read compared its bytes too
        assert abs(s["ratio"] - s["grpc_mib_s"] / s["tcp_mib_s"]) < 1e-6
    assert report["hardware"]["cpu_cores"] >= 1
    assert report["goal_ratio_at_64mib_plus"]["worst"] is None  # no size of 64 MiB or more was run


def test_bench_kv_without_nixl_in_its_connectors_leaves_nixl_out_of_the_size_table(capsys):
    assert main(["bench", "kv", "--json", "--no-engines", "--sizes", "1", "--repeats", "1", "--connectors", "pdserve",
                 "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "nixl_mib_s" not in report["sizes"][0]
