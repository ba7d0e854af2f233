"""A running lofit-serve speaks the metrics protocol of llm-d's endpoint picker (EPP): ``/metrics``, read while
steered requests run (the session's ``main_server``; adapters named in ``model``, as a gateway routes them), has the
families the EPP's vLLM engine config reads (llm-d/llm-d-router@ebab687
``pkg/epp/framework/plugins/datalayer/extractor/metrics/factories.go``) with the labels its extractor reads, and
fed to ``deploy/llm-d/epp_model.py`` — a model of the EPP's LoRA-affinity scorer, not a run of the EPP — it scores
this replica 1.0 for a running adapter and 0.8 (room to load one) for any other."""

from __future__ import annotations

import concurrent.futures
import importlib.util
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import AUTH, PROMPT, REPO

STEERED = ("truthfulqa", "random4")  # adapters of main_server
EPP_LABELS = {"running_lora_adapters", "waiting_lora_adapters", "max_lora"}  # …/extractor/metrics/extractor.go
EPP_GAUGES = ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc")


def load_epp_model():
    spec = importlib.util.spec_from_file_location("epp_model", REPO / "deploy" / "llm-d" / "epp_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pages(main_server) -> list[tuple[float, str]]:
    """``(time read, /metrics text)`` taken while one long completion per adapter runs, then one after."""
    bodies = [{"model": name, "prompt": PROMPT, "max_tokens": 200, "ignore_eos": True} for name in STEERED]
    read = []
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        pending = [pool.submit(httpx.post, f"{main_server.url}/v1/completions", json=b, headers=AUTH, timeout=300)
                   for b in bodies]
        while not all(p.done() for p in pending):
            read.append((time.time(), httpx.get(f"{main_server.url}/metrics", timeout=30).text))
            time.sleep(0.25)
        assert [p.result().status_code for p in pending] == [200] * len(bodies)
    read.append((time.time(), httpx.get(f"{main_server.url}/metrics", timeout=30).text))
    return read


def families(text: str) -> dict:
    return {family.name: family for family in text_string_to_metric_families(text)}


def test_lora_requests_info_is_the_gauge_the_epp_reads(pages):
    seen_running = set()
    for read_at, text in pages:
        info = families(text)["vllm:lora_requests_info"]
        assert info.type == "gauge"
        [sample] = info.samples
        assert set(sample.labels) == EPP_LABELS and sample.labels["max_lora"].isdigit()
        assert abs(sample.value - read_at) < 60  # the value is the time of the reading
        seen_running |= set(filter(None, sample.labels["running_lora_adapters"].split(",")))
    assert seen_running == set(STEERED)


def test_the_epp_s_engine_gauges_are_there(pages):
    for _, text in pages:
        found = families(text)
        for name in EPP_GAUGES:
            assert name in found and found[name].type == "gauge" and found[name].samples, name
    peak = max(max(s.value for s in families(text)["vllm:num_requests_running"].samples) for _, text in pages)
    assert peak >= 1


def test_the_model_of_the_epp_scores_running_adapters_first(pages):
    epp = load_epp_model()
    scored = 0
    for _, text in pages:
        running, waiting, max_lora = epp.lora_info(text)
        assert running <= set(STEERED) and waiting <= set(STEERED) and max_lora >= len(STEERED) + 1
        for adapter in running:
            assert epp.lora_affinity_score(text, adapter) == 1.0
            scored += 1
        assert epp.lora_affinity_score(text, "an-adapter-not-in-flight") == 0.8  # capacity: max_lora is large
    assert scored and not epp.lora_info(pages[-1][1])[0]  # scored while running; nothing running after
