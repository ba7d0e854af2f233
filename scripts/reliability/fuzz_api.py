"""Fuzz the HTTP API of ``lofit-serve`` from its own OpenAPI schema with schemathesis.

    .venv/bin/python scripts/reliability/fuzz_api.py [--url URL --key KEY] [--max-examples 100] [--seed 0]
        [--max-tokens 4] [--operations REGEX] [--out fuzz.json]

Without ``--url`` it starts a ``lofit-serve`` on a free port (SmolLM2-135M, float32, ``--max-model-len 128``,
a copy of ``adapters/truthfulqa``, an API key and an admin key) and stops it at the end. Every operation of
``/openapi.json`` gets up to ``--max-examples`` positive cases (valid per the schema) and as many negative
ones (invalid), sent with the admin key, which grants every route; the default gives over 1000 cases in all.
Two positive cases in three that name a model or an adapter get a served one (any string fits the schema,
and a random name only meets a 404), so generation itself is fuzzed too.
Each response goes through schemathesis' checks ``not_a_server_error``, ``status_code_conformance``,
``content_type_conformance`` and ``response_schema_conformance``; a request that gets no answer within
``--timeout`` seconds is a failure too (a hang). Generation is slow on a CPU, so token counts the schema
allows are bounded by ``--max-tokens`` (larger values the schema refuses are sent as they are), ``n`` and
``best_of`` by 2; the server refuses what does not fit its own limits. The schema is vLLM's whole protocol plus
ours; ``POST /scale_elastic_ep`` is left out unless ``--operations`` names it (see ``SKIPPED``).

Prints ``cases: N, failures: N, 5xx: N`` and per-operation counts, writes the figures and each distinct
failure (with a curl command to reproduce it) as JSON to ``--out``, and exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import Failure, FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from server.launch import ServerStartError, running_lofit_serve  # noqa: E402

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
TOKEN_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens", "min_tokens", "max_gen_toks")
COUNT_FIELDS = {"n": 2, "best_of": 2}  # sequences per request: bounded like token counts
# Operations left out by default, with the reason: vLLM's elastic expert-parallel scaling drains and re-plans the
# whole deployment (on a server started without it, vLLM answers 500 "Scale failed").
SKIPPED = {"POST /scale_elastic_ep": "vLLM's elastic scaling of the deployment (500 on a server without it)"}
SCHEMA_MAX_TOKENS = 32768  # the schema's bound on max_tokens; larger values are left for the server to refuse


@dataclass
class OperationStats:
    positive: int = 0
    negative: int = 0
    failures: int = 0
    server_errors: int = 0
    statuses: collections.Counter = field(default_factory=collections.Counter)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def cases(self) -> int:
        return self.positive + self.negative


@dataclass
class Fuzzer:
    url: str
    key: str
    max_tokens: int
    timeout: float
    models: list[str] = field(default_factory=list)  # what GET /v1/models lists
    adapters: list[str] = field(default_factory=list)  # what GET /adapters lists
    stats: dict[str, OperationStats] = field(default_factory=dict)
    failures: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)  # (operation, title) -> first
    steered: int = 0

    def use_known_names(self, case: Any) -> None:
        """Name a served model or loaded adapter in two positive cases out of three, so that they reach
        generation instead of all getting 404 for a random name (any string fits the schema)."""
        body = case.body
        self.steered += 1
        if not isinstance(body, dict) or self.steered % 3 == 0:
            return
        if isinstance(body.get("model"), str) and self.models:
            body["model"] = self.models[self.steered % len(self.models)]
        if isinstance(body.get("adapter"), str) and self.adapters:
            body["adapter"] = self.adapters[self.steered % len(self.adapters)]
        if isinstance(body.get("adapters"), dict) and body["adapters"] and self.adapters:
            weights = list(body["adapters"].values())
            body["adapters"] = {self.adapters[i % len(self.adapters)]: w for i, w in enumerate(weights)}

    def bound_tokens(self, case: Any) -> None:
        """Lower token counts that the schema allows to ``max_tokens`` (chat without one gets one)."""
        body = case.body
        if not isinstance(body, dict):
            return
        for name in TOKEN_FIELDS:
            value = body.get(name)
            if type(value) is int and self.max_tokens < value <= SCHEMA_MAX_TOKENS:
                body[name] = self.max_tokens
        for name, bound in COUNT_FIELDS.items():
            value = body.get(name)
            if type(value) is int and bound < value <= SCHEMA_MAX_TOKENS:
                body[name] = bound
        if case.operation.path == "/v1/chat/completions" and all(body.get(n) is None for n in TOKEN_FIELDS):
            body["max_tokens"] = self.max_tokens

    def run_case(self, case: Any, mode: GenerationMode) -> None:
        label = case.operation.label
        stats = self.stats.setdefault(label, OperationStats())
        if mode.is_positive:
            stats.positive += 1
        else:
            stats.negative += 1
        if mode.is_positive:
            self.use_known_names(case)
        self.bound_tokens(case)
        headers = {"Authorization": f"Bearer {self.key}"}
        started = time.perf_counter()
        try:
            response = case.call(base_url=self.url, headers=headers, timeout=self.timeout)
        except requests.RequestException as exc:
            stats.failures += 1
            stats.statuses["no response"] += 1
            self.record(label, mode, "No response (timeout or connection error)", str(exc), None, case)
            return
        finally:
            stats.seconds += time.perf_counter() - started
        stats.statuses[str(response.status_code)] += 1
        if response.status_code >= 500:
            stats.server_errors += 1
        try:
            case.validate_response(response, checks=CHECKS, headers=headers)
        except FailureGroup as group:
            stats.failures += 1
            for failure in group.exceptions:
                self.record(label, mode, failure.title, _message(failure), response.status_code, case, headers)

    def record(self, label: str, mode: GenerationMode, title: str, message: str, status: int | None, case: Any,
               headers: dict[str, str] | None = None) -> None:
        entry = self.failures.setdefault((label, title), {
            "operation": label, "title": title, "mode": mode.value, "status": status, "message": message[:2000],
            "curl": _curl(case, self.url, headers), "count": 0})
        entry["count"] += 1

    def fuzz(self, operation: Any, mode: GenerationMode, max_examples: int, seed: int) -> None:
        @hypothesis_seed(seed)
        @settings(max_examples=max_examples, deadline=None, database=None, verbosity=Verbosity.quiet,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case: Any) -> None:
            self.run_case(case, mode)

        stats = self.stats.setdefault(operation.label, OperationStats())
        try:
            run()
        except Unsatisfiable:
            stats.notes.append(f"no {mode.value} cases can be generated")
        except Exception as exc:  # generation itself failed: report it and fuzz the rest
            stats.failures += 1
            title = f"generation error {type(exc).__name__}"
            self.failures[(operation.label, title)] = {"operation": operation.label, "title": title,
                                                       "mode": mode.value, "status": None,
                                                       "message": str(exc)[:2000], "curl": None, "count": 1}


def _message(failure: Failure) -> str:
    return getattr(failure, "message", "") or str(failure)


def _curl(case: Any, url: str, headers: dict[str, str] | None) -> str | None:
    try:
        return case.as_curl_command(headers=headers, base_url=url)
    except Exception:  # a case that cannot be written as curl still counts; it just has no command
        return None


@contextmanager
def started_server(max_model_len: int, log_path: Path) -> Iterator[tuple[str, str]]:
    """A ``lofit-serve`` subprocess with a copy of the shipped adapter; yields (url, admin key)."""
    admin_key = secrets.token_hex(16)
    workdir = Path(tempfile.mkdtemp(prefix="lofit-fuzz-"))
    shutil.copytree(REPO / "adapters" / "truthfulqa", workdir / "adapters" / "truthfulqa")
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "LOFIT_ADMIN_KEY": admin_key, "LOFIT_API_KEY": secrets.token_hex(16)}
    args = ["--adapters-dir", str(workdir / "adapters"), "--dtype", "float32", "--max-model-len", str(max_model_len),
            "--max-num-seqs", "8"]
    try:
        with running_lofit_serve(args, log_path, env=env) as server:
            print(f"server ready at {server.url} (log: {log_path})", flush=True)
            yield server.url, admin_key
    except ServerStartError as exc:
        raise SystemExit(f"fuzz_api: {exc}") from None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def summary(fuzzer: Fuzzer, ready_after: int | None) -> dict[str, Any]:
    stats = fuzzer.stats
    return {
        "url": fuzzer.url,
        "cases": sum(s.cases for s in stats.values()),
        "failures": sum(s.failures for s in stats.values()),
        "server_errors": sum(s.server_errors for s in stats.values()),
        "ready_after": ready_after,
        "operations": {label: {"cases": s.cases, "positive": s.positive, "negative": s.negative,
                               "failures": s.failures, "server_errors": s.server_errors,
                               "statuses": dict(sorted(s.statuses.items())), "seconds": round(s.seconds, 1),
                               "notes": s.notes}
                       for label, s in sorted(stats.items())},
        "distinct_failures": sorted(fuzzer.failures.values(), key=lambda f: (f["operation"], f["title"])),
    }


def fuzz_all(url: str, key: str, args: argparse.Namespace) -> dict[str, Any]:
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", timeout=30)
    fuzzer = Fuzzer(url=url, key=key, max_tokens=args.max_tokens, timeout=args.timeout)
    headers = {"Authorization": f"Bearer {key}"}
    fuzzer.models = [m["id"] for m in httpx.get(f"{url}/v1/models", headers=headers).json()["data"]]
    fuzzer.adapters = [a["name"] for a in httpx.get(f"{url}/adapters", headers=headers).json()["adapters"]]
    wanted = re.compile(args.operations) if args.operations else None
    for result in schema.get_all_operations():
        operation = result.ok()
        if (wanted and not wanted.search(operation.label)) or (not wanted and operation.label in SKIPPED):
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            started = time.perf_counter()
            fuzzer.fuzz(operation, mode, args.max_examples, args.seed)
            s = fuzzer.stats[operation.label]
            print(f"  {operation.label:<28} {mode.value:<8} cases {s.positive if mode.is_positive else s.negative:>4}"
                  f"  failures so far {s.failures:>3}  {time.perf_counter() - started:6.1f} s", flush=True)
    try:
        ready_after = httpx.get(f"{url}/ready", timeout=10).status_code
    except httpx.HTTPError:
        ready_after = None
    return summary(fuzzer, ready_after)


def report(result: dict[str, Any]) -> None:
    print(f"\ncases: {result['cases']}, failures: {result['failures']}, 5xx: {result['server_errors']}, "
          f"/ready afterwards: {result['ready_after']}")
    for label, op in result["operations"].items():
        print(f"  {label:<28} cases {op['cases']:>4} ({op['positive']}+ {op['negative']}-)  failures "
              f"{op['failures']:>3}  5xx {op['server_errors']:>3}  statuses {op['statuses']}  {op['seconds']} s"
              + (f"  [{'; '.join(op['notes'])}]" if op["notes"] else ""))
    for failure in result["distinct_failures"]:
        print(f"\nFAILURE {failure['operation']} ({failure['mode']}, status {failure['status']}, "
              f"x{failure['count']}): {failure['title']}\n  {failure['message'][:500]}\n  {failure['curl']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server (default: start one)")
    parser.add_argument("--key", default=os.environ.get("LOFIT_ADMIN_KEY"),
                        help="the admin key of --url (default: $LOFIT_ADMIN_KEY)")
    parser.add_argument("--max-examples", type=int, default=100,
                        help="cases per operation and mode (positive, negative) at most")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=4, help="bound on the token counts of generation cases")
    parser.add_argument("--max-model-len", type=int, default=128, help="of the server started here")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a request may take (else: a hang)")
    parser.add_argument("--operations", help="only operations whose label ('POST /generate') matches this regex")
    parser.add_argument("--out", type=Path, default=Path("fuzz_api.json"))
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if args.url:
        result = fuzz_all(args.url.rstrip("/"), args.key or "", args)
    else:
        log_path = args.out.with_suffix(".server.log")
        with started_server(args.max_model_len, log_path) as (url, key):
            result = fuzz_all(url, key, args)
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["settings"] = {k: str(v) for k, v in vars(args).items() if k != "key"}
    report(result)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten: {args.out} ({result['seconds']} s)")
    return 1 if result["failures"] or result["ready_after"] != 200 else 0


if __name__ == "__main__":
    sys.exit(main())
