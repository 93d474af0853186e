"""The comparison rows and the headline ratio of `pdserve bench serve`'s report."""

from pdserve.bench.serve_report import comparison, headline

REFERENCE = {"ttft_ms": 200.0, "tpot_ms": 40.0, "from": "colocated"}


def _configs(colocated: dict[str, float], disaggregated: dict[str, float]) -> dict:
    return {name: {"goodput": {scale: {"goodput_rps": g} for scale, g in by_scale.items()}}
            for name, by_scale in (("colocated", colocated), ("disaggregated", disaggregated))}


def test_rows_give_objectives_goodput_and_ratio_per_scale():
    rows = comparison(_configs({"1": 0.0, "2": 0.5}, {"1": 0.2, "2": 1.5}), REFERENCE, [2.0, 1.0], "colocated")
    assert [r["slo_scale"] for r in rows] == [1.0, 2.0]
    assert (rows[1]["ttft_ms"], rows[1]["tpot_ms"]) == (400.0, 80.0)
    assert rows[0]["ratio_to_baseline"] == {"colocated": None, "disaggregated": None}  # colocated served nothing
    assert rows[1]["ratio_to_baseline"] == {"colocated": 1.0, "disaggregated": 3.0}


def test_headline_is_taken_at_the_tightest_scale_colocated_still_serves():
    rows = comparison(_configs({"1": 0.0, "2": 0.5, "3": 1.0}, {"1": 0.2, "2": 0.9, "3": 3.0}), REFERENCE,
                      [1.0, 2.0, 3.0], "colocated")
    goal = headline(rows, "colocated", "disaggregated", 2.0)
    assert goal["slo_scale"] == 2.0 and goal["ratio"] == 1.8 and goal["met"] is False
    rows = comparison(_configs({"1": 0.25}, {"1": 0.5}), REFERENCE, [1.0], "colocated")
    assert headline(rows, "colocated", "disaggregated", 2.0)["met"] is True


def test_headline_when_colocated_never_met_the_objectives():
    rows = comparison(_configs({"1": 0.0}, {"1": 0.4}), REFERENCE, [1.0], "colocated")
    goal = headline(rows, "colocated", "disaggregated", 2.0)
    assert goal["slo_scale"] is None and goal["met"] is False and "colocated" in goal["note"]
