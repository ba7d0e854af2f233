"""All serving benchmarks in one run: throughput, latency, LoRA, the transformers reference, hot loads, memory.

    .venv/bin/python -m bench.run_all [--quick] [--only offline,http,lora,reference,hotload,memory]
                                      [--out bench/results/<date>/] [--concurrency 1,16,64] [--rounds 4]
                                      [--prompt-tokens 128] [--output-tokens 64] [--loads 50]

Parts (``--only`` picks some; the default runs all):

* ``offline``   throughput (output tokens/s) and latency (TTFT, ITL; p50/p99) through vLLM's ``AsyncLLM``
                (streamed with ``RequestOutputKind.DELTA``): stock vLLM against the plugin with no adapter,
                1, 16 and 64 distinct adapters, a per-request strength and a two-adapter composition;
* ``http``      the same through HTTP with streaming: vLLM's own OpenAI server on the stock model against
                ``lofit-serve`` (``POST /generate``), both started here as subprocesses;
* ``lora``      vLLM multi-LoRA (rank 8 on ``o_proj``, and on q,k,v,o) with 1/16/64 distinct LoRAs, next to
                the plugin in the same execution mode (eager on vLLM's CPU build, which runs LoRA eagerly);
* ``reference`` LoFiT on transformers ``generate`` with per-row adapters (``lofit.intervene.apply_adapters``)
                against the plugin with the same adapters, at the same batch sizes;
* ``hotload``   adapter load latency: ``POST /adapters`` on ``lofit-serve`` and ``lofit_load`` on the engine,
                next to vLLM's ``add_lora``;
* ``memory``    the adapter bank's size per 100 adapters (computed and measured in the engine) and the RSS of
                the engine processes with and without the plugin.

Everything runs in three phases, each with its own engines up together so that the variants compared with
each other are interleaved in time: every round runs each variant once at each concurrency, round 0 is a
warm-up and dropped, and the median of the other rounds is reported. Prompts are random token ids (text
that tokenises to the same length over HTTP), different for every request, so no prefix-cache hits;
``ignore_eos`` fixes the output length. Stock vLLM and vLLM's LoRA engines run with the LoFiT plugin
left out of ``VLLM_PLUGINS`` in their processes, so they are plain vLLM.

Writes ``results.json``, ``results.md`` (all tables, the machine, the command, the goals with PASS/MISS)
and PNG plots into the results folder; each part prints its table as it finishes. This file is the driver;
the settings, variants, targets, phases, goals, tables, report and plots are in ``bench/serving/``.
"""

from __future__ import annotations

import asyncio
import datetime
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from bench.common import machine_info, make_adapters
from bench.serving.config import Config, parse_args, set_environment
from bench.serving.goals import goals_table
from bench.serving.memory import bank_rows_computed
from bench.serving.phase_http import phase_http
from bench.serving.phase_lora import phase_lora
from bench.serving.phase_offline import phase_offline
from bench.serving.plots import plots
from bench.serving.report import save
from bench.serving.tables import memory_tables, show


async def run(cfg: Config) -> dict:
    """The three phases that the chosen parts need, each with its engines up together; an exception in one is
    recorded in ``results["errors"]`` and the others go on. Saves the results after every phase."""
    from vllm.plugins import load_general_plugins

    load_general_plugins()  # here, once, with the LoFiT plugin: stock engines only hide it from their children
    results: dict[str, Any] = {
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": shlex.join([".venv/bin/python", "-m", "bench.run_all", *sys.argv[1:]]),
        "machine": machine_info(), "settings": {k: str(v) for k, v in vars(cfg).items()},
        "engines": {}, "hotload": {}, "errors": {},
        "memory": {"computed": bank_rows_computed(cfg), "rss": []}}
    paths = make_adapters(cfg.model, cfg.distinct, cfg.work / "adapters")
    phases = [("offline", {"offline", "reference", "memory"}, lambda: phase_offline(cfg, results, paths)),
              ("lora", {"lora", "hotload"}, lambda: phase_lora(cfg, results, paths)),
              ("http", {"http", "hotload", "memory"}, lambda: phase_http(cfg, results))]
    for name, needs, phase in phases:
        if not needs & set(cfg.parts):
            continue
        print(f"\n=== phase {name} ===", flush=True)
        started = time.perf_counter()
        try:
            await phase()
        except Exception:  # noqa: BLE001 - record it, go on with the other phases
            results["errors"][name] = traceback.format_exc()
            print(f"[{name}] FAILED:\n{results['errors'][name]}", flush=True)
        results.setdefault("phase_seconds", {})[name] = time.perf_counter() - started
        save(results, cfg)
    if "memory" in cfg.parts:
        show("memory", memory_tables(results["memory"]))
    return results


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv, description=__doc__)
    set_environment(cfg)
    cfg.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lofit-bench-") as work:
        cfg.work = Path(work)
        results = asyncio.run(run(cfg))
    results["plots"] = plots(results, cfg)
    save(results, cfg)
    show("goals", goals_table(results, cfg))
    print(f"wrote {cfg.out / 'results.md'}, {cfg.out / 'results.json'} and {', '.join(results['plots'])}")


if __name__ == "__main__":  # also keeps vLLM's spawned processes, which import this module, from running it
    main()
