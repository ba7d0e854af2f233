"""``lofit-serve``: start the HTTP server on a model with a folder of adapters.

    lofit-serve [--model DIR] [--adapters-dir DIR] [--adapter-store URI] [--host 127.0.0.1] [--port 8000]
                [--api-key KEY] [--admin-key KEY] [--dtype auto] [--max-model-len 2048] [--max-num-seqs 64]
                [--max-adapters 256] [--kv-cache-gib 1] [--max-prompt-tokens N] [--served-model-name NAME]

                [any `vllm serve` flag, e.g. --enforce-eager --tool-call-parser hermes --enable-auto-tool-choice]

The defaults serve the embedded SmolLM2-135M-Instruct with the shipped ``adapters/``. Every other flag goes to
vLLM's own ``vllm serve`` parser (engine and OpenAI-layer flags alike) and means what it means there. Every
lofit-serve flag may also come from an environment variable named after it, ``LOFIT_`` + the flag in capitals
with ``_`` for ``-`` (``LOFIT_API_KEY``, ``LOFIT_ADMIN_KEY``, ``LOFIT_ADAPTERS_DIR``, ``LOFIT_MAX_MODEL_LEN``,
...); a flag on the command line wins. ``LOFIT_ENGINE_ARGS`` holds extra vLLM flags (``"--enforce-eager --seed
1"``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import socket
import sys
from pathlib import Path

from server.settings import Settings
from server.vllm_flags import vllm_namespace


def env_name(flag: str) -> str:
    """``--max-model-len`` -> ``LOFIT_MAX_MODEL_LEN``."""
    return "LOFIT_" + flag.lstrip("-").replace("-", "_").upper()


def json_object(text: str) -> dict:
    """A JSON object given on the command line (``argparse`` type: a ValueError is its usage error)."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object")
    return value


def adapter_names(text: str) -> list[str]:
    """A comma-separated list of adapter names, or ``all`` (``argparse`` type)."""
    import re

    from server.steering import ADAPTER_NAME

    names = [n.strip() for n in text.split(",") if n.strip()]
    if names != ["all"] and ("all" in names or not all(re.fullmatch(ADAPTER_NAME, n) for n in names)):
        raise argparse.ArgumentTypeError(f"{text!r} is not 'all' or a comma-separated list of adapter names")
    return names


def check_architecture(parser: argparse.ArgumentParser, model: Path) -> None:
    """Refuse, before any engine starts, a checkpoint of an architecture vLLM does not serve natively."""
    from lofit.vllm.architectures import wrapper_for

    try:
        architectures = json.loads((model / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError) as exc:
        parser.exit(2, f"lofit-serve: cannot read {model / 'config.json'}: {exc}\n")
    try:
        wrapper_for(architectures[0] if architectures else "?")
    except ValueError as exc:
        parser.exit(2, f"lofit-serve: {model} is a {', '.join(architectures) or 'model of unknown architecture'}: "
                       f"{exc}\n")


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
    flag("--adapters-dir", defaults.adapters_dir, Path, doc="folder of adapter folders loaded at start and by name "
         "(default: the shipped adapters/)")
    flag("--adapter-store", doc="shared adapter store, an fsspec URI (s3://bucket/prefix, gs://..., file:///dir, "
         "memory://x): uploads write through to it, adapters a request names are loaded from it on a miss")
    flag("--adapter-store-options", {}, json_object, doc="fsspec storage options for the store, as a JSON object "
         "(e.g. '{\"endpoint_url\": \"http://minio:9000\"}')")
    flag("--adapter-cache-dir", defaults.adapter_cache_dir, Path, doc="this node's folder for adapters fetched "
         "from the store (default: $XDG_CACHE_HOME/lofit/adapters)")
    flag("--adapter-store-preload", [], adapter_names, doc="adapters loaded from the store at start, comma-separated, "
         "or 'all' (the others load on their first request)")
    flag("--adapter-store-ttl", defaults.adapter_store_ttl, float, doc="seconds a store adapter is served before "
         "its content hash in the store is checked again (0: on every request)")
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
    parser.add_argument("--trust-chat-control-tokens", action="store_true",
                        default=os.environ.get(env_name("--trust-chat-control-tokens"), "") in ("1", "true"),
                        help="tokenise control-token strings inside chat messages as control tokens (vLLM's "
                             "default); without it they are plain text, so a message cannot inject a turn")
    parser.add_argument("--no-ui", dest="ui", action="store_false",
                        default=os.environ.get(env_name("--no-ui"), "") not in ("1", "true"),
                        help="do not serve the steering playground at /ui")
    args, rest = parser.parse_known_args(argv)
    try:
        rest = shlex.split(os.environ.get("LOFIT_ENGINE_ARGS", "")) + rest
    except ValueError as exc:
        parser.exit(2, f"lofit-serve: LOFIT_ENGINE_ARGS cannot be parsed ({exc})\n")
    if not (args.model / "config.json").is_file():
        from lofit.default_model import default_model_dir

        if args.model.resolve() == default_model_dir().resolve():
            why = "the default model is not prepared yet: run scripts/setup.sh"
        elif not args.model.exists():
            why = "no such file or directory"
        else:
            why = "not a Hugging Face checkpoint directory (no config.json)"
        parser.exit(2, f"lofit-serve: --model {args.model}: {why}\n")

    check_architecture(parser, args.model)
    if args.kv_cache_gib is not None and args.kv_cache_gib < 1:
        parser.exit(2, "lofit-serve: --kv-cache-gib must be a whole number of GiB, at least 1\n")
    if args.api_key is not None and args.api_key == args.admin_key:
        parser.exit(2, "lofit-serve: --api-key and --admin-key must differ\n")
    if args.max_prompt_tokens is not None and not 1 <= args.max_prompt_tokens < args.max_model_len:
        parser.exit(2, "lofit-serve: --max-prompt-tokens must be at least 1 and below --max-model-len\n")
    if not (args.adapter_store_ttl >= 0 and args.adapter_store_ttl != float("inf")):
        parser.exit(2, "lofit-serve: --adapter-store-ttl must be a number of seconds, at least 0\n")
    if args.adapter_store_preload and args.adapter_store is None:
        parser.exit(2, "lofit-serve: --adapter-store-preload needs --adapter-store\n")
    if args.adapter_store is not None and not args.adapter_store.strip():
        parser.exit(2, "lofit-serve: --adapter-store is empty; give a URI (s3://bucket/prefix, file:///dir) or "
                       "leave the flag out\n")
    if args.adapter_store is not None:
        from server.adapter_store import AdapterStore

        try:
            store = AdapterStore(args.adapter_store, args.adapter_store_options)
        except (ValueError, TypeError) as exc:
            parser.exit(2, f"lofit-serve: --adapter-store: {exc}\n")
        if not store.root.strip("/"):
            parser.exit(2, f"lofit-serve: --adapter-store {args.adapter_store!r}: give a bucket or folder "
                           "(s3://bucket/prefix, file:///dir)\n")
    return Settings(model=args.model, adapters_dir=args.adapters_dir, adapter_store=args.adapter_store,
                    adapter_store_options=args.adapter_store_options, adapter_cache_dir=args.adapter_cache_dir,
                    adapter_store_ttl=args.adapter_store_ttl, adapter_store_preload=args.adapter_store_preload,
                    host=args.host, port=args.port,
                    api_key=args.api_key, admin_key=args.admin_key, served_model_name=args.served_model_name,
                    dtype=args.dtype, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                    max_adapters=args.max_adapters, max_prompt_tokens=args.max_prompt_tokens,
                    kv_cache_gib=args.kv_cache_gib, ui=args.ui,
                    trust_chat_control_tokens=args.trust_chat_control_tokens,
                    vllm_flags=rest, vllm_args=vllm_namespace(rest))


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def own_log_handler() -> None:
    """Give the ``lofit`` loggers (request lines, start-up) their own INFO handler on stderr. Importing vLLM's app
    pulls in ``model_hosting_container_standards``, which sets the root logger and its handlers to ERROR
    (``SAGEMAKER_CONTAINER_LOG_LEVEL``, default ERROR), which would silence them."""
    logger = logging.getLogger("lofit")
    if not any(getattr(h, "_lofit", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        handler._lofit = True
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def check_port_free(host: str, port: int) -> None:
    """Exit 2 at once when ``host:port`` cannot be listened on (in use, or not an address of this machine),
    rather than after the engine has started (minutes)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as exc:
        print(f"lofit-serve: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        raise SystemExit(2) from None


def check_steerable(model: Path) -> None:
    """Exit 2 with one line, before any engine starts, for a model LoFiT cannot steer: vLLM's class for it is
    hybrid, recurrent or attention-free (:func:`lofit.vllm.models.model_class_refusal`), or LoFiT cannot find
    its heads (its config and tensor names are read, no weights: :func:`lofit.heads.check_checkpoint`)."""
    from lofit.heads import UnsupportedModelError, check_checkpoint
    from lofit.vllm.models import model_class_refusal, native_model_class

    try:
        architectures = json.loads((model / "config.json").read_text()).get("architectures") or []
        base = native_model_class(architectures[0]) if architectures else None
        refusal = model_class_refusal(base) if base is not None else None
        if refusal:
            raise UnsupportedModelError(refusal)
        check_checkpoint(model)
    except (UnsupportedModelError, OSError, ValueError) as exc:
        print(f"lofit-serve: {model}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from server.app import create_app

    settings = parse(argv)
    check_port_free(settings.host, settings.port)
    check_steerable(settings.model)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    app = create_app(settings)
    own_log_handler()
    tls = {name: getattr(settings.vllm_args, name) for name in ("ssl_keyfile", "ssl_certfile", "ssl_ca_certs",
                                                                 "ssl_cert_reqs", "ssl_ciphers")}
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info",
                                           timeout_graceful_shutdown=30, root_path=settings.vllm_args.root_path
                                           or "", **{k: v for k, v in tls.items() if v is not None}))
    app.state.server = server  # vLLM's engine-error handler stops it through this

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
