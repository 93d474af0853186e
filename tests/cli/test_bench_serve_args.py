"""`pdserve bench serve` refuses bad arguments before it deploys anything."""

import pytest

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
    (["--compare", "colocated,fancy"], "--compare takes colocated and/or disaggregated"),
])
def test_bad_arguments_exit_2_saying_what_is_wrong(args, words, capsys):
    assert _exit_code(["bench", "serve", *args]) == 2
    assert words in capsys.readouterr().err
