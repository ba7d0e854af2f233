"""vLLM's own ``vllm serve`` flags, parsed and checked for ``lofit-serve`` (shared by the CLI and the app)."""

from __future__ import annotations

import argparse

UNSUPPORTED = {"uds": "a Unix socket", "api_server_count": "several API server processes",
               "headless": "headless mode", "grpc": "the gRPC server"}  # vLLM flags lofit-serve does not run


def vllm_namespace(flags: list[str]) -> argparse.Namespace:
    """vLLM's ``vllm serve`` arguments from ``flags`` (engine and front-end flags alike), checked by vLLM's own
    parser; exits 2 with a clear message for a flag vLLM does not know."""
    from server.vllm_api import FlexibleArgumentParser, make_arg_parser  # vLLM imports in seconds: only when used

    parser = make_arg_parser(FlexibleArgumentParser(prog="lofit-serve"))
    args, unknown = parser.parse_known_args(flags)
    if unknown:
        flag = next((u for u in unknown if u.startswith("-")), unknown[0])
        raise SystemExit(f"lofit-serve: unknown flag {flag.split('=')[0]} (neither lofit-serve's nor a vLLM "
                         "`vllm serve` flag)")
    defaults = parser.parse_args([])
    for name, what in UNSUPPORTED.items():
        value = getattr(args, name, None)
        if value is True or (value not in (None, False, getattr(defaults, name, None)) and value != 1):
            raise SystemExit(f"lofit-serve: --{name.replace('_', '-')} ({what}) is not supported by lofit-serve")
    return args
