"""`pdserve bench kv`'s side by side: pdserve's connector and vLLM's NixlConnector on the same
real engines and prompts, and its refusals."""

from __future__ import annotations

import json
import secrets

import pytest

from pdserve.bench import kv_connectors
from pdserve.bench.engine_process import cpu_list
from pdserve.cli.main import main
from pdserve.model_store import resolve_model


def test_a_cpu_bind_names_its_cores_in_every_form_vllm_takes():
    assert cpu_list("0") == {0}
    assert cpu_list("0-2") == {0, 1, 2}
    assert cpu_list("0,3-4") == {0, 3, 4}
    assert cpu_list("0|1") == {0, 1}  # one list per TP rank


def test_an_unknown_connector_is_refused_naming_the_known_ones(capsys):
    assert main(["bench", "kv", "--connectors", "pdserve,mooncake", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "mooncake" in err and "pdserve, nixl" in err


@pytest.mark.parametrize("args", [["--sizes", "1,x"], ["--sizes", "0"], ["--connector-prompts", "1000,-4"]])
def test_sizes_and_prompt_lengths_that_are_not_positive_numbers_are_refused(args, capsys):
    assert main(["bench", "kv", *args, "--quiet"]) == 2
    assert "positive whole numbers" in capsys.readouterr().err


def test_nixl_asked_for_but_not_installed_is_refused_with_the_install_command(capsys, monkeypatch):
    monkeypatch.setattr(kv_connectors, "nixl_available", lambda: False)
    assert main(["bench", "kv", "--connectors", "nixl", "--quiet"]) == 2
    assert "pip install --no-deps nixl==1.5.1 nixl-cu13==1.5.1" in capsys.readouterr().err


@pytest.mark.slow
def test_both_connectors_move_the_same_kv_and_each_decode_engine_answers_the_prefills_first_token():
    assert kv_connectors.nixl_available(), "make venv installs nixl"
    rows = kv_connectors.as_dicts(kv_connectors.run(str(resolve_model(None)), secrets.token_hex(16),
                                                    ["pdserve", "nixl"], [200], runs=1))
    by = {r["connector"]: r for r in rows}
    assert set(by) == {"plain", "pdserve", "nixl"} and len(rows) == 3
    # run() raises when a decode engine's first token is not the prefill's: reaching here checked both.
    assert by["plain"]["prefill_slowdown"] == 1.0 and by["plain"]["decode_first_token_ms"] is None
    assert by["pdserve"]["kv_mib"] == by["nixl"]["kv_mib"] > 0  # whole blocks of the same prompt
    for name in ("pdserve", "nixl"):
        assert by[name]["prefill_slowdown"] == pytest.approx(by[name]["prefill_ms"] / by["plain"]["prefill_ms"])
        assert by[name]["decode_first_token_ms"] > 0
        assert by[name]["transfer_ms"] > 0
    assert by["nixl"]["transfer_mib_s"] == pytest.approx(by["nixl"]["kv_mib"] / by["nixl"]["transfer_ms"] * 1e3)
    assert by["pdserve"]["transfer_mib_s"] is None  # its bytes/s is the synthetic table's, not an engine's
    table = kv_connectors.summary(rows)
    assert any(line.split()[:2] == ["nixl", "200"] for line in table)
    json.dumps(rows)  # the report's JSON takes the rows as they are
