"""``lofit-serve``: start the HTTP server on a model with a folder of adapters.

    lofit-serve [--model DIR] [--adapters-dir DIR] [--host 127.0.0.1] [--port 8000] [--api-key KEY]
                [--admin-key KEY] [--dtype auto] [--max-model-len 2048] [--max-num-seqs 64]
                [--max-adapters 256] [--kv-cache-gib 1] [--max-prompt-tokens N] [--served-model-name NAME]
                [any vLLM engine flag, e.g. --enforce-eager --max-num-batched-tokens 4096]

The defaults serve the embedded SmolLM2-135M-Instruct with the shipped ``adapters/``. Every flag may also
come from an environment variable named after it, ``LOFIT_`` + the flag in capitals with ``_`` for ``-``
(``LOFIT_API_KEY``, ``LOFIT_ADMIN_KEY``, ``LOFIT_ADAPTERS_DIR``, ``LOFIT_MAX_MODEL_LEN``, ...); a flag on the
command line wins. ``LOFIT_ENGINE_ARGS`` holds extra vLLM engine flags (``"--enforce-eager --seed 1"``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import sys
from pathlib import Path

from server.settings import Settings


def engine_flags(rest: list[str]) -> dict:
    """``["--enforce-eager", "--max-num-batched-tokens", "4096"]`` -> ``{"enforce_eager": True, ...}``, checked
    against vLLM's engine arguments."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    out, i = {}, 0
    while i < len(rest):
        token = rest[i]
        if not token.startswith("--"):
            raise SystemExit(f"lofit-serve: unexpected argument {token!r}")
        key, _, inline = token[2:].partition("=")
        key = key.replace("-", "_")
        if key not in known:
            raise SystemExit(f"lofit-serve: unknown flag --{key.replace('_', '-')} (neither lofit-serve's nor a "
                             "vLLM engine argument)")
        if inline:
            value, i = inline, i + 1
        elif i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            value, i = rest[i + 1], i + 2
        else:
            value, i = "true", i + 1
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def env_name(flag: str) -> str:
    """``--max-model-len`` -> ``LOFIT_MAX_MODEL_LEN``."""
    return "LOFIT_" + flag.lstrip("-").replace("-", "_").upper()


def check_architecture(parser: argparse.ArgumentParser, model: Path) -> None:
    """Refuse, before any engine starts, a checkpoint the LoFiT plugin has no wrapper for."""
    from lofit.vllm.plugin import BASE_ARCHITECTURES, WRAPPERS

    try:
        architectures = json.loads((model / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError) as exc:
        parser.exit(2, f"lofit-serve: cannot read {model / 'config.json'}: {exc}\n")
    if not any(a in BASE_ARCHITECTURES or a in WRAPPERS for a in architectures):
        parser.exit(2, f"lofit-serve: {model} is a {', '.join(architectures) or 'model of unknown architecture'}; "
                       f"LoFiT's vLLM plugin serves {', '.join(sorted(BASE_ARCHITECTURES))}\n")


def parse(argv: list[str] | None = None) -> Settings:
    defaults = Settings()
    parser = argparse.ArgumentParser(prog="lofit-serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)

    def flag(name: str, default: object = None, cast: type = str, doc: str | None = None) -> None:
        """A flag whose default comes from its ``LOFIT_*`` environment variable when that is set."""
        raw = os.environ.get(env_name(name))
        if raw:
            try:
                default = cast(raw)
            except ValueError:
                parser.exit(2, f"lofit-serve: {env_name(name)}={raw!r} is not a valid {name} value\n")
        parser.add_argument(name, type=cast, default=default, help=doc)

    flag("--model", defaults.model, Path)
    flag("--adapters-dir", defaults.adapters_dir, Path)
    flag("--host", defaults.host)
    flag("--port", defaults.port, int)
    flag("--api-key", doc="key for the inference routes (Authorization: Bearer KEY)")
    flag("--admin-key", doc="key for the adapter admin routes; without it they are refused")
    flag("--served-model-name")
    flag("--dtype", defaults.dtype)
    flag("--max-model-len", defaults.max_model_len, int)
    flag("--max-num-seqs", defaults.max_num_seqs, int)
    flag("--max-adapters", defaults.max_adapters, int)
    flag("--max-prompt-tokens", None, int)
    flag("--kv-cache-gib", None, int, doc="CPU KV cache size in whole GiB (VLLM_CPU_KVCACHE_SPACE)")
    args, rest = parser.parse_known_args(argv)
    try:
        rest = shlex.split(os.environ.get("LOFIT_ENGINE_ARGS", "")) + rest
    except ValueError as exc:
        parser.exit(2, f"lofit-serve: LOFIT_ENGINE_ARGS cannot be parsed ({exc})\n")
    if not (args.model / "config.json").is_file():
        parser.exit(2, f"lofit-serve: {args.model} is not a model directory (no config.json); run "
                       "scripts/setup.sh to prepare the default model\n")
    check_architecture(parser, args.model)
    if args.kv_cache_gib is not None and args.kv_cache_gib < 1:
        parser.exit(2, "lofit-serve: --kv-cache-gib must be a whole number of GiB, at least 1\n")
    if args.api_key is not None and args.api_key == args.admin_key:
        parser.exit(2, "lofit-serve: --api-key and --admin-key must differ\n")
    return Settings(model=args.model, adapters_dir=args.adapters_dir, host=args.host, port=args.port,
                    api_key=args.api_key, admin_key=args.admin_key, served_model_name=args.served_model_name,
                    dtype=args.dtype, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                    max_adapters=args.max_adapters, max_prompt_tokens=args.max_prompt_tokens,
                    kv_cache_gib=args.kv_cache_gib, engine_args=engine_flags(rest))


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from server.app import create_app

    settings = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info",
                                           timeout_graceful_shutdown=30))

    def stop() -> None:
        server.should_exit = True

    app.state.lofit.stop_server = stop
    # SIGTERM/SIGINT: uvicorn stops taking connections, drains running requests (30 s at most), then
    # re-raises the signal, so the status is 143/130 as for any process ended by it.
    server.run()
    if os.environ.get("LOFIT_SERVER_FAILED"):
        sys.exit(1)  # the engine died: a failure a supervisor should restart


if __name__ == "__main__":
    main()
