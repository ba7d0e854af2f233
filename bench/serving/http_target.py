"""A server as a target: ``lofit-serve`` (``POST /generate``) or vLLM's OpenAI server (``/v1/completions``),
started here as a subprocess and driven with streamed HTTP requests."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from bench.common import Stream, summarise, text_prompts, tree_memory
from bench.serving.config import ADMIN_KEY, REPO, Config
from bench.serving.rounds import checked
from bench.serving.variants import Choice, http_fields
from server.launch import ServerProcess, free_port, lofit_serve_argv, without_lofit


class HttpTarget:
    """A server subprocess: ``lofit-serve`` (``POST /generate``) or vLLM's OpenAI server (``/v1/completions``)."""

    def __init__(self, name: str, kind: str, cfg: Config, tokenizer: Any, gpu_share: float) -> None:
        self.name, self.kind, self.cfg, self.tokenizer = name, kind, cfg, tokenizer
        port = free_port()
        common = ["--model", str(cfg.model), "--host", "127.0.0.1", "--dtype", cfg.dtype,
                  "--max-model-len", str(cfg.max_model_len), "--max-num-seqs", str(cfg.max_seqs), "--seed", "0",
                  "--gpu-memory-utilization", str(gpu_share)]
        env = {"VLLM_CPU_KVCACHE_SPACE": str(cfg.kv_cache_gib), "VLLM_WORKER_MULTIPROC_METHOD": "fork"}
        if kind == "lofit":
            argv = lofit_serve_argv(port, [*common, "--adapters-dir", str(cfg.work / "adapters"),
                                           "--admin-key", ADMIN_KEY, "--kv-cache-gib", str(cfg.kv_cache_gib)])
            ready = "/ready"
        else:
            argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--port", str(port), *common,
                    "--served-model-name", "base"]
            env["VLLM_PLUGINS"] = without_lofit()  # plain vLLM
            ready = "/health"
        self.argv = argv
        self.server = ServerProcess(argv, port, cfg.out / "logs" / f"{kind}-server.log", name=name, env=env,
                                    ready_path=ready, cwd=REPO)
        self.start_s = 0.0

    def wait(self) -> None:
        self.start_s = self.server.wait_ready()
        print(f"[server] {self.name} ready in {self.start_s:.0f} s on {self.server.url}", flush=True)

    async def run(self, count: int, choice: Callable[[int], Choice], seed: int) -> dict:
        import httpx

        prompts = text_prompts(self.tokenizer, count, self.cfg.prompt_tokens, seed)
        limits = httpx.Limits(max_connections=count + 8, max_keepalive_connections=count + 8)
        async with httpx.AsyncClient(base_url=self.server.url, timeout=900, limits=limits) as client:

            async def one(i: int) -> Stream:
                sampling = {"max_tokens": self.cfg.output_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
                if self.kind == "lofit":
                    path, body = "/generate", {"prompt": prompts[i], **sampling, **http_fields(choice(i))}
                else:
                    path, body = "/v1/completions", {"model": "base", "prompt": prompts[i], "return_token_ids": True,
                                                     **sampling}
                stream = Stream(time.perf_counter())
                async with client.stream("POST", path, json=body) as response:
                    if response.status_code != 200:
                        raise RuntimeError(f"{self.name}: HTTP {response.status_code}: {await response.aread()}")
                    async for line in response.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        event = json.loads(line[6:])
                        if self.kind == "lofit":
                            stream.add(len(event.get("token_ids") or []))
                        else:
                            stream.add(sum(len(c.get("token_ids") or []) for c in event.get("choices", [])))
                return stream

            start = time.perf_counter()
            streams = await asyncio.gather(*(one(i) for i in range(count)))
        return checked(summarise(streams, time.perf_counter() - start), count, self.cfg)

    def memory(self) -> dict:
        return tree_memory([self.server.proc.pid])

    def shutdown(self) -> None:
        self.server.stop()
