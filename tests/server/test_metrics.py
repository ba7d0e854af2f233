"""``/metrics`` as gateways read it (llm-d's scheduler, vLLM's production-stack router): vLLM's own families plus
``vllm:lora_requests_info`` with vLLM's labels, parsed by ``prometheus_client``'s parser while steered requests
run (the session's ``main_server``)."""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import AUTH, BASE, PROMPT

VLLM_FAMILIES = ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds",
                 "vllm:inter_token_latency_seconds", "vllm:prompt_tokens", "vllm:generation_tokens",
                 "vllm:request_success", "vllm:lora_requests_info"]
LOFIT_FAMILIES = ["lofit_requests", "lofit_request_latency_seconds", "lofit_time_to_first_token_seconds",
                  "lofit_output_tokens", "lofit_requests_running", "lofit_requests_waiting", "lofit_adapters_loaded",
                  "lofit_adapter_loads"]


READ_AT = "_read_at"  # when a reading was taken (time.time()), beside its metric families


def families(url: str) -> dict:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {family.name: family for family in text_string_to_metric_families(text)} | {READ_AT: time.time()}


@pytest.fixture(scope="module")
def during_steered_requests(main_server) -> list[dict]:
    """Readings of ``/metrics`` taken while two long steered requests run (one per adapter) beside an unsteered
    one, then one after they end."""
    readings = []
    bodies = [{"prompt": PROMPT, "max_tokens": 200, "ignore_eos": True, **choice}
              for choice in ({"adapter": "truthfulqa"}, {"adapter": "random4"}, {})]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        pending = [pool.submit(httpx.post, f"{main_server.url}/generate", json=b, headers=AUTH, timeout=300)
                   for b in bodies]
        while not all(p.done() for p in pending):
            readings.append(families(main_server.url))
            time.sleep(0.25)
        assert all(p.result().status_code == 200 for p in pending)
    readings.append(families(main_server.url))
    return readings


def test_vllm_and_lofit_families_are_there(during_steered_requests):
    for name in VLLM_FAMILIES + LOFIT_FAMILIES:
        assert name in during_steered_requests[-1], name
    running = during_steered_requests[-1]["vllm:num_requests_running"].samples[0]
    assert running.labels["model_name"] == BASE


def test_lora_requests_info_names_the_running_adapters_as_vllm_does(during_steered_requests, main_server):
    seen_running = set()
    for reading in during_steered_requests:
        [sample] = reading["vllm:lora_requests_info"].samples  # one series, always current
        assert set(sample.labels) == {"max_lora", "running_lora_adapters", "waiting_lora_adapters"}
        # the value is the time of vLLM's last update, as in vLLM: recent when the page was read
        assert sample.labels["max_lora"].isdigit() and abs(sample.value - reading[READ_AT]) < 60
        seen_running |= set(filter(None, sample.labels["running_lora_adapters"].split(",")))
        assert BASE not in sample.labels["running_lora_adapters"]
    assert seen_running == {"truthfulqa", "random4"}
    last = during_steered_requests[-1]["vllm:lora_requests_info"].samples[0].labels
    assert last["running_lora_adapters"] == last["waiting_lora_adapters"] == ""


def test_per_adapter_gauges_follow_the_engine(during_steered_requests):
    peak = {}
    for reading in during_steered_requests:
        for sample in reading["lofit_requests_running"].samples:
            peak[sample.labels["adapter"]] = max(peak.get(sample.labels["adapter"], 0), sample.value)
    assert peak == {"truthfulqa": 1, "random4": 1, BASE: 1}
    assert not during_steered_requests[-1]["lofit_requests_running"].samples
