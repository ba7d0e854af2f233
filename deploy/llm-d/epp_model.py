"""A MODEL of llm-d's endpoint picker (EPP), not a run of it: how its LoRA-affinity scorer scores one replica.

Transcribed from llm-d/llm-d-router at ebab687 (2026-08-22), the commit ../shared/docs/scale-out.md cites:

* ``pkg/epp/framework/plugins/datalayer/extractor/metrics/loraspec.go`` ``getLatestMetric``: every label
  permutation of ``vllm:lora_requests_info`` is its own series and its value is a timestamp; the series with the
  largest value wins (strictly larger, starting from -1, so the first of equal values stays);
* ``…/extractor/metrics/extractor.go`` ``populateLoRAMetrics``: ``running_lora_adapters`` and
  ``waiting_lora_adapters`` are comma-separated lists (names trimmed, empty ones dropped); ``max_lora`` is an
  int (``strconv.Atoi``; an empty or invalid label leaves the previous value: 0 for a fresh endpoint);
* ``pkg/epp/framework/plugins/scheduling/scorer/loraaffinity/lora_affinity.go`` ``Score``, keyed on the request's
  target model (the adapter named in ``model``): 1.0 if running; else 0.8 if len(running) + len(waiting) <
  max_lora; else 0.6 if waiting; else 0.0.

Where the family is missing the EPP keeps the endpoint's previous reading; this model starts from none (no
adapters, max_lora 0), so the score is 0.0. A series' value is a gauge's or counter's value, 0 for any other
type (``…/extractor/metrics/spec.go`` ``extractValue``).
"""

from __future__ import annotations

import re

from prometheus_client.parser import text_string_to_metric_families

LORA_INFO = "vllm:lora_requests_info"


def lora_info(metrics_text: str) -> tuple[set[str], set[str], int]:
    """(running adapters, waiting adapters, max_lora) from a replica's /metrics page, as the EPP extracts them."""
    latest, recent = None, -1.0
    for family in text_string_to_metric_families(metrics_text):
        if family.name == LORA_INFO:
            for sample in family.samples:
                value = sample.value if family.type in ("gauge", "counter") else 0.0  # extractValue: 0 otherwise
                if value > recent:
                    latest, recent = sample, value
    if latest is None:
        return set(), set(), 0
    names = lambda key: {n.strip() for n in latest.labels.get(key, "").split(",") if n.strip()}  # noqa: E731
    max_lora = latest.labels.get("max_lora", "")
    return (names("running_lora_adapters"), names("waiting_lora_adapters"),
            int(max_lora) if re.fullmatch(r"[+-]?[0-9]+", max_lora) else 0)


def lora_affinity_score(metrics_text: str, adapter: str) -> float:
    """The lora-affinity-scorer's score of this replica for a request whose ``model`` is ``adapter``."""
    running, waiting, max_lora = lora_info(metrics_text)
    if adapter in running:
        return 1.0
    if len(running) + len(waiting) < max_lora:
        return 0.8
    return 0.6 if adapter in waiting else 0.0
