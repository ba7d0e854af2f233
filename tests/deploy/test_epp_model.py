"""``deploy/llm-d/epp_model.py`` (a model of llm-d's LoRA-affinity scorer, not a run of it) on hand-written
``/metrics`` pages; ``tests/server/test_gateway_protocol.py`` feeds it a running lofit-serve's page."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EPP_MODEL = Path(__file__).resolve().parents[2] / "deploy" / "llm-d" / "epp_model.py"


@pytest.fixture(scope="module")
def epp():
    spec = importlib.util.spec_from_file_location("epp_model", EPP_MODEL)  # deploy/ is not a package
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def page(*series: tuple[str, str, str, float], kind: str = "gauge") -> str:
    """A /metrics page with one ``vllm:lora_requests_info`` series per (max_lora, running, waiting, value)."""
    lines = ["# HELP vllm:lora_requests_info Running stats on lora requests.", f"# TYPE vllm:lora_requests_info {kind}"]
    lines += [f'vllm:lora_requests_info{{max_lora="{m}",running_lora_adapters="{r}",waiting_lora_adapters="{w}"}} {v}'
              for m, r, w, v in series]
    return "\n".join(["# TYPE vllm:num_requests_waiting gauge", "vllm:num_requests_waiting 0.0", *lines]) + "\n"


def test_scores_follow_the_scorer_s_branches(epp):
    text = page(("4", "a, b", "c", 1.7e9))
    assert epp.lora_info(text) == ({"a", "b"}, {"c"}, 4)  # comma lists, names trimmed
    assert epp.lora_affinity_score(text, "a") == 1.0  # running
    assert epp.lora_affinity_score(text, "z") == 0.8  # 3 adapters in flight < max_lora 4: room for one more
    assert epp.lora_affinity_score(text, "c") == 0.8  # capacity is checked before waiting, as upstream
    full = page(("3", "a,b", "c", 1.7e9))
    assert epp.lora_affinity_score(full, "c") == 0.6  # full, but already queued here
    assert epp.lora_affinity_score(full, "z") == 0.0  # full
    assert epp.lora_affinity_score(full, "a") == 1.0


def test_the_series_with_the_largest_value_wins(epp):
    text = page(("8", "old", "", 1000.0), ("8", "new", "", 2000.0), ("8", "older", "", 500.0))
    assert epp.lora_info(text) == ({"new"}, set(), 8)
    assert epp.lora_affinity_score(text, "new") == 1.0 and epp.lora_affinity_score(text, "old") == 0.8
    assert epp.lora_info(page(("1", "first", "", 5.0), ("1", "second", "", 5.0)))[0] == {"first"}  # ties: first


def test_empty_lists_missing_family_and_bad_max_lora(epp):
    assert epp.lora_info(page(("256", "", "", 1.0))) == (set(), set(), 256)
    assert epp.lora_affinity_score(page(("256", "", "", 1.0)), "a") == 0.8
    assert epp.lora_info("# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting 0.0\n") == (set(), set(), 0)
    assert epp.lora_affinity_score("", "a") == 0.0  # no reading: no capacity known
    assert epp.lora_info(page(("many", "a", "", 1.0)))[2] == 0  # strconv.Atoi fails: the previous value (none)
    # an untyped family: the EPP reads every value as 0, so the first series wins
    assert epp.lora_info(page(("2", "x", "", 1.0), ("2", "y", "", 9.0), kind="untyped"))[0] == {"x"}
