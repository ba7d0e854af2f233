"""Everything the server is started with (from ``lofit-serve`` flags or environment variables)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lofit.default_model import default_model_dir

REPO = Path(__file__).resolve().parents[1]


def default_cache_dir() -> Path:
    """Where adapters fetched from the store are kept on this node: ``$XDG_CACHE_HOME/lofit/adapters``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lofit" / "adapters"


@dataclass
class Settings:
    model: Path = field(default_factory=default_model_dir)
    adapters_dir: Path = REPO / "adapters"
    adapter_store: str | None = None  # fsspec URI of the shared store (server/adapter_store.py)
    adapter_store_options: dict[str, Any] = field(default_factory=dict)  # fsspec storage options
    adapter_cache_dir: Path = field(default_factory=default_cache_dir)  # this node's copy of fetched adapters
    adapter_store_ttl: float = 30.0  # seconds before a store-loaded adapter's content hash is checked again
    adapter_store_preload: list[str] = field(default_factory=list)  # names loaded from the store at start ("all")
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # inference routes (Authorization: Bearer <key>)
    admin_key: str | None = None  # adapter load/unload; without it those routes are refused
    served_model_name: str | None = None  # the OpenAI ``model`` name of the base model (default: folder name)
    dtype: str = "auto"
    max_model_len: int = 2048
    max_num_seqs: int = 64
    max_adapters: int = 256  # adapters loaded at once
    max_prompt_tokens: int | None = None  # default: max_model_len - 1
    max_body_bytes: int = 1 << 20
    max_upload_bytes: int = 64 << 20
    trust_chat_control_tokens: bool = False  # True: chat content may carry control tokens (vLLM's default)
    ui: bool = True  # the playground at /ui (server/api_ui.py)
    kv_cache_gib: int | None = None  # CPU KV cache size (VLLM_CPU_KVCACHE_SPACE)
    vllm_flags: list[str] = field(default_factory=list)  # every other flag, as given (for vLLM's parser)
    vllm_args: argparse.Namespace | None = None  # vLLM's `vllm serve` arguments parsed from ``vllm_flags``

    @property
    def base_name(self) -> str:
        return self.served_model_name or Path(self.model).name

    @property
    def prompt_limit(self) -> int:
        return self.max_prompt_tokens or self.max_model_len - 1
