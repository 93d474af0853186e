"""`pdserve bench serve` refuses bad arguments before it deploys anything, and hands the objective
settings it was given to the benchmark."""

import pytest

from pdserve.bench import serve_bench
from pdserve.bench.conversations import ConversationWorkload
from pdserve.bench.serve_settings import AbsoluteObjective, judged_objectives
from pdserve.cli.main import main


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's own errors
        return int(exc.code)


@pytest.mark.parametrize("args, words", [
    (["--workload", "no-such-workload"], "neither built in"),
    (["--requests", "0"], "requests_per_rate"),
    (["--slo-scale", "1,x"], "comma-separated numbers"),
    (["--compare", "colocated,fancy"], "'fancy' is not a configuration: colocated, disaggregated, adaptive"),
    (["--compare", "colocated/cache-lucky"], "each optionally followed by /cache-aware or /cache-blind"),
    (["--compare", "colocated,colocated"], "names a configuration twice"),
    (["--workload", "multi-turn", "--compare", ","], "names no configuration"),
    (["--objectives", "15000"], "argument --objectives: expected TTFT_MS:TPOT_MS pairs"),
    (["--objectives", "summarization=15000:fast"], "argument --objectives: expected TTFT_MS:TPOT_MS pairs"),
    (["--objectives", "chat=1000:200,chat=2000:100"], "objectives_ms: chat given twice"),
    (["--ttft-scales", "1,3,10"], "ttft_scales and tpot_scales make a grid together"),
    (["--ttft-scales", "1,x", "--tpot-scales", "1"], "argument --ttft-scales: expected comma-separated numbers"),
    (["--workloads", "chat,code,chat"], "names no workload, or one name twice"),
    (["--workloads", "chat,code", "--workload", "code"], "not both"),
    (["--workloads", "chat,no-such-workload"], "neither built in"),
    (["--workloads", "chat,code", "--url", "http://127.0.0.1:1"], "one --workload at a time"),
])
def test_bad_arguments_exit_2_saying_what_is_wrong(args, words, capsys):
    assert _exit_code(["bench", "serve", *args]) == 2
    assert words in capsys.readouterr().err


class _Deploying(Exception):
    """Raised where the benchmark would deploy: the settings, configurations and workload it was handed."""


@pytest.fixture
def deploying_with(monkeypatch):
    """`bench serve` with some arguments, up to where it would deploy: (settings, configurations, workload)."""
    def deploy(cfg, model_path, modes, workload, settings, progress=None):
        raise _Deploying(settings, modes, workload)

    monkeypatch.setattr(serve_bench, "bench_configs", deploy)

    def deploying_with(args: list[str]) -> tuple:
        with pytest.raises(_Deploying) as deploying:
            main(["bench", "serve", *args])
        return deploying.value.args

    return deploying_with


@pytest.fixture
def settings_for(deploying_with):
    """The settings `bench serve` would deploy with."""
    return lambda args: deploying_with(args)[0]


def test_a_conversation_workload_is_run_on_each_configuration_with_its_cache_routing(deploying_with):
    _, modes, (workload,) = deploying_with(["--workload", "multi-turn", "--compare", "colocated,colocated/cache-blind"])
    assert modes == ["colocated", "colocated/cache-blind"]
    assert isinstance(workload, ConversationWorkload) and workload.turns_mean == 2.0


def test_a_sweep_hands_every_workload_in_order_to_one_benchmark(deploying_with):
    _, modes, workloads = deploying_with(["--workloads", "chat, summarization,code,azure-conversation",
                                          "--compare", "colocated,disaggregated,adaptive"])
    assert [w.name for w in workloads] == ["chat", "summarization", "code", "azure-conversation"]
    assert modes == ["colocated", "disaggregated", "adaptive"]


@pytest.mark.parametrize("args, slo_scales, keys", [
    ([], [1.0, 1.5, 2.0, 3.0, 5.0], ["1", "1.5", "2", "3", "5"]),
    (["--ttft-scales", "1,3", "--tpot-scales", "1,1.5"], [],
     ["ttft1x/tpot1x", "ttft1x/tpot1.5x", "ttft3x/tpot1x", "ttft3x/tpot1.5x"]),
    (["--objectives", "summarization=15000:160,1000:200"], [], ["summarization", "1000ms/200ms"]),
    (["--slo-scale", "2", "--objectives", "code=1000:200"], [2.0], ["2", "code"]),
])
def test_objective_options_become_the_settings_judged(args, slo_scales, keys, settings_for):
    settings = settings_for(args)
    assert settings.slo_scales == slo_scales
    assert [o.key for o in judged_objectives(settings, {"ttft_ms": 100.0, "tpot_ms": 10.0})] == keys


def test_absolute_objectives_are_read_as_ttft_then_tpot_milliseconds(settings_for):
    assert settings_for(["--objectives", "summarization=15000:160, 1000:200"]).objectives_ms == [
        AbsoluteObjective(name="summarization", ttft_ms=15000, tpot_ms=160), AbsoluteObjective(ttft_ms=1000, tpot_ms=200)]
