"""The serving benchmark's verdicts and report (``bench/serving/goals.py``, ``bench/serving/report.py``), from the
results of the committed full run and hand-made cases."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from bench.serving.config import parse_args
from bench.serving.goals import goals
from bench.serving.report import report

RUN = Path(__file__).resolve().parents[2] / "docs" / "benchmarks" / "2026-11-27-cpu"


@pytest.fixture(scope="module")
def results() -> dict:
    return json.loads((RUN / "results.json").read_text())


@pytest.fixture(scope="module")
def cfg():
    return parse_args(["--out", "/nonexistent", "--verbose"])


def verdicts(rows: list[list]) -> dict[str, tuple[str, str]]:
    return {name: (measured, verdict) for name, measured, _target, verdict, _source in rows}


def test_goals_of_the_committed_run_match_its_report(results, cfg):
    """The verdicts recomputed from results.json are the ones its results.md (and docs/benchmarks.md) show."""
    got = verdicts(goals(results, cfg))
    assert got["plugin 16 distinct / stock"] == ("1.003", "PASS")
    assert got["plugin 64 distinct / 1 distinct"] == ("0.999", "PASS")
    assert got["plugin / transformers reference"] == ("2.177", "MISS")
    assert got["hot-load p50 (HTTP)"] == ("6.3 ms", "PASS")
    text = report(results, cfg)
    assert "| plugin / transformers reference | 2.177 | >= 5x | MISS |" in text
    assert text.split("\n## ")[1:] and "## Memory" in text and "VLLM::Worker" in text


def test_a_slow_plugin_misses_and_a_missing_part_is_not_run(results, cfg):
    slowed = copy.deepcopy(results)
    for row in slowed["offline"]:
        if row["variant"] == "plugin, 16 distinct":
            row["output_tokens_per_s"] *= 0.9
    del slowed["http"], slowed["hotload"]
    got = verdicts(goals(slowed, cfg))
    assert got["plugin 16 distinct / stock"] == ("0.903", "MISS")
    assert got["plugin 64 distinct / 1 distinct"][1] == "PASS"
    assert got["hot-load p50 (HTTP)"] == ("not run", "—")
    assert got["lofit-serve 16 distinct / vLLM api_server (informational)"] == ("not run", "—")
