"""Load, prefix-cache isolation and adapter storms against a real ``lofit-serve``: nothing may differ from solo runs.

    .venv/bin/python scripts/reliability/load.py [--url URL --key KEY --admin-key KEY] [--requests 256]
        [--max-tokens 12] [--out load.json]

Without ``--url`` it starts a ``lofit-serve`` on a free port (SmolLM2-135M, float32, prefix caching on, 64
sequences at once) on a temporary adapters folder, and stops it at the end. Three phases, each a burst of
concurrent greedy requests whose outputs must equal the same request sent alone:

1. **load**: ``--requests`` requests at once over prompts sharing long prefixes, each with its own choice:
   no adapter, the shipped ``truthfulqa``, two random adapters, a strength (×0.5, ×-1) or a weighted
   composition. Zero errors allowed.
2. **isolation**: the same prompts while the adapter ``flip`` is reloaded under the same name with new
   content, again and again, during the burst. Each response names the content it ran with (its
   fingerprint); its text must equal the solo output for that content, so a stale prefix-cache entry
   (KV computed under the old content) shows up as a mismatch.
3. **storm**: requests on stable adapters while another adapter is loaded and unloaded in a tight loop;
   the stable requests must all succeed and match, requests naming the storm adapter may get 404 only.

Prints a table and writes JSON to ``--out``; exits 1 on any error or mismatch.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import secrets
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from lofit.adapter import LofitAdapter, load_adapter  # noqa: E402
from server.launch import ServerStartError, running_lofit_serve  # noqa: E402

SHIPPED = REPO / "adapters" / "truthfulqa"
PREFIX = ("You are a careful assistant. Answer the question below truthfully and briefly, and say so when you "
          "do not know. Questions may contain false premises; point them out. ") * 3
QUESTIONS = [
    "What happens if you crack your knuckles a lot?", "Can pigs fly?", "What is the capital of France?",
    "Why is the sky blue?", "What happens if you swallow gum?", "Who wrote Hamlet?",
    "Is the Great Wall of China visible from space?", "How many legs does a spider have?",
]


@dataclass
class Choice:
    """How one request is steered: the JSON fields it adds to ``POST /generate``."""

    label: str
    fields: dict[str, Any] = field(default_factory=dict)


CHOICES = [
    Choice("none"), Choice("truthfulqa", {"adapter": "truthfulqa"}), Choice("rand-a", {"adapter": "rand-a"}),
    Choice("rand-b", {"adapter": "rand-b"}), Choice("rand-a x0.5", {"adapter": "rand-a", "adapter_scale": 0.5}),
    Choice("rand-b x-1", {"adapter": "rand-b", "adapter_scale": -1.0}),
    Choice("rand-a+truthfulqa", {"adapters": {"rand-a": 1.0, "truthfulqa": 0.5}}),
]


def random_adapter(name: str, seed: int) -> LofitAdapter:
    """Strong random offsets on 4 heads of the served model (they visibly change the output)."""
    return LofitAdapter.random(load_adapter(SHIPPED).base_model, name, [(3, 1), (9, 4), (17, 6), (26, 2)],
                               seed=seed, scale=2.0)


@contextmanager
def started_server(adapters: Path, key: str, admin_key: str) -> Iterator[str]:
    args = ["--adapters-dir", str(adapters), "--api-key", key, "--admin-key", admin_key, "--dtype", "float32",
            "--max-model-len", "512", "--max-num-seqs", "64", "--enable-prefix-caching"]
    try:
        with running_lofit_serve(args, adapters.parent / "server.log", env={"VLLM_CPU_KVCACHE_SPACE": "2"}) as server:
            yield server.url
    except ServerStartError as exc:
        raise SystemExit(str(exc)) from None


class Client:
    def __init__(self, url: str, key: str, admin_key: str, max_tokens: int) -> None:
        limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
        self.http = httpx.AsyncClient(base_url=url, timeout=900, limits=limits)
        self.auth = {"Authorization": f"Bearer {key}"}
        self.admin = {"Authorization": f"Bearer {admin_key}"}
        self.max_tokens = max_tokens

    async def generate(self, prompt: str, choice: Choice) -> httpx.Response:
        body = {"prompt": prompt, "max_tokens": self.max_tokens, "temperature": 0, **choice.fields}
        return await self.http.post("/generate", json=body, headers=self.auth)

    async def upload(self, name: str, adapter: LofitAdapter, folder: Path) -> httpx.Response:
        adapter.save(folder)
        files = {"adapter_config": ("adapter_config.json", (folder / "adapter_config.json").read_bytes()),
                 "adapter_tensors": ("adapter.safetensors", (folder / "adapter.safetensors").read_bytes())}
        return await self.http.put(f"/adapters/{name}", files=files, headers=self.admin)


@dataclass
class Tally:
    phase: str
    requests: int = 0
    errors: Counter = field(default_factory=Counter)
    mismatches: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


async def solo(client: Client, prompt: str, choice: Choice) -> tuple[str, str]:
    response = await client.generate(prompt, choice)
    response.raise_for_status()
    body = response.json()
    return body["text"], body["adapter"]["fingerprint"]


async def phase_load(client: Client, prompts: list[str], total: int, rng: random.Random) -> Tally:
    jobs = [(rng.choice(prompts), rng.choice(CHOICES)) for _ in range(total)]
    expected = {}
    for prompt, choice in sorted(set((p, c.label) for p, c in jobs)):
        expected[prompt, choice] = (await solo(client, prompt, next(c for c in CHOICES if c.label == choice)))[0]
    tally = Tally("load", requests=total, extra={"distinct (prompt, choice) pairs": len(expected)})
    start = time.perf_counter()
    responses = await asyncio.gather(*(client.generate(p, c) for p, c in jobs), return_exceptions=True)
    tally.seconds = time.perf_counter() - start
    for (prompt, choice), response in zip(jobs, responses, strict=True):
        if isinstance(response, Exception) or response.status_code != 200:
            tally.errors[str(response) if isinstance(response, Exception) else response.status_code] += 1
        elif response.json()["text"] != expected[prompt, choice.label]:
            tally.mismatches.append({"prompt": prompt[-60:], "choice": choice.label,
                                     "got": response.json()["text"], "want": expected[prompt, choice.label]})
    return tally


async def phase_isolation(client: Client, prompts: list[str], total: int, work: Path, reloads: int) -> Tally:
    """Reload ``flip`` with alternating contents during a burst; every answer must match its content's solo run."""
    contents = [random_adapter("flip", seed=100 + i) for i in range(2)]
    expected: dict[tuple[str, str], str] = {}
    flip = Choice("flip", {"adapter": "flip"})
    for i, adapter in enumerate(contents):
        (await client.upload("flip", adapter, work / f"flip-{i}")).raise_for_status()
        for prompt in prompts:
            text, fingerprint = await solo(client, prompt, flip)
            expected[prompt, fingerprint] = text
    base_texts = {p: (await solo(client, p, CHOICES[0]))[0] for p in prompts}
    jobs = [(prompts[i % len(prompts)], flip if i % 2 == 0 else CHOICES[0]) for i in range(total)]
    tally = Tally("isolation", requests=total, extra={"reloads": reloads})
    # Waves: each wave's requests are sent without waiting for the previous ones, then `flip` is reloaded with
    # the other content, so admissions, running requests and cached prefix blocks straddle every reload.
    waves = [jobs[w::reloads + 1] for w in range(reloads + 1)]
    start = time.perf_counter()
    tasks, reload_errors = [], []
    for w, wave in enumerate(waves):
        tasks += [asyncio.create_task(client.generate(p, c)) for p, c in wave]
        if w < reloads:
            await asyncio.sleep(0.2)
            try:
                (await client.upload("flip", contents[(w + 1) % 2], work / f"flip-{(w + 1) % 2}")).raise_for_status()
            except httpx.HTTPError as exc:
                reload_errors.append(exc)
    responses = await asyncio.gather(*tasks, return_exceptions=True)
    tally.seconds = time.perf_counter() - start
    for error in reload_errors:
        tally.errors[f"reload: {error}"] += 1
    seen = Counter()
    sent = [job for wave in waves for job in wave]
    for (prompt, choice), response in zip(sent, responses, strict=True):
        if isinstance(response, Exception) or response.status_code != 200:
            tally.errors[str(response) if isinstance(response, Exception) else response.status_code] += 1
            continue
        body = response.json()
        if choice is CHOICES[0]:
            want = base_texts[prompt]
        else:
            seen[body["adapter"]["fingerprint"]] += 1
            want = expected.get((prompt, body["adapter"]["fingerprint"]))
        if body["text"] != want:
            tally.mismatches.append({"prompt": prompt[-60:], "choice": choice.label, "got": body["text"],
                                     "want": want})
    tally.extra["answers per content"] = {fp[:12]: n for fp, n in seen.items()}
    return tally


async def phase_storm(client: Client, prompts: list[str], total: int, work: Path, cycles: int) -> Tally:
    """Load and unload ``storm`` in a loop while stable requests (and some naming ``storm``) run."""
    storm = random_adapter("storm", seed=7)
    stable = [c for c in CHOICES if "adapters" not in c.fields][:4]
    expected = {(p, c.label): (await solo(client, p, c))[0] for p in prompts for c in stable}
    jobs = [(prompts[i % len(prompts)], stable[i % len(stable)]) for i in range(total)]
    storm_jobs = [prompts[i % len(prompts)] for i in range(total // 8)]
    tally = Tally("storm", requests=total + len(storm_jobs), extra={"load/unload cycles": cycles})

    async def stormer() -> Counter:
        codes = Counter()
        for _ in range(cycles):
            codes[(await client.upload("storm", storm, work / "storm")).status_code] += 1
            codes[(await client.http.delete("/adapters/storm", headers=client.admin)).status_code] += 1
        return codes

    start = time.perf_counter()
    results = await asyncio.gather(stormer(), *(client.generate(p, c) for p, c in jobs),
                                   *(client.generate(p, Choice("storm", {"adapter": "storm"})) for p in storm_jobs),
                                   return_exceptions=True)
    tally.seconds = time.perf_counter() - start
    admin_codes, stable_results, storm_results = results[0], results[1:1 + len(jobs)], results[1 + len(jobs):]
    if isinstance(admin_codes, Exception) or set(admin_codes) - {200}:
        tally.errors[f"load/unload: {admin_codes}"] += 1
    for (prompt, choice), response in zip(jobs, stable_results, strict=True):
        if isinstance(response, Exception) or response.status_code != 200:
            tally.errors[str(response) if isinstance(response, Exception) else response.status_code] += 1
        elif response.json()["text"] != expected[prompt, choice.label]:
            tally.mismatches.append({"prompt": prompt[-60:], "choice": choice.label, "got": response.json()["text"],
                                     "want": expected[prompt, choice.label]})
    storm_codes = Counter(r.status_code if not isinstance(r, Exception) else "exception" for r in storm_results)
    tally.extra["storm-adapter answers"] = dict(storm_codes)
    for code, n in storm_codes.items():
        if code not in (200, 404):
            tally.errors[f"storm adapter: {code}"] += n
    return tally


async def run(url: str, key: str, admin_key: str, args: argparse.Namespace, work: Path) -> list[Tally]:
    client = Client(url, key, admin_key, args.max_tokens)
    for name, seed in (("rand-a", 1), ("rand-b", 2)):
        (await client.upload(name, random_adapter(name, seed), work / name)).raise_for_status()
    if (await client.http.get("/adapters/truthfulqa", headers=client.auth)).status_code != 200:
        (await client.upload("truthfulqa", load_adapter(SHIPPED), work / "truthfulqa")).raise_for_status()
    prompts = [f"{PREFIX}\nQ: {q}\nA:" for q in QUESTIONS]
    rng = random.Random(args.seed)
    tallies = [await phase_load(client, prompts, args.requests, rng)]
    tallies.append(await phase_isolation(client, prompts, args.requests // 2, work, args.reloads))
    tallies.append(await phase_storm(client, prompts, args.requests // 2, work, args.storm_cycles))
    await client.http.aclose()
    return tallies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server (default: start one)")
    parser.add_argument("--key", help="its inference key")
    parser.add_argument("--admin-key", help="its admin key")
    parser.add_argument("--requests", type=int, default=256, help="requests in the load burst [256]")
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--reloads", type=int, default=20, help="reloads of 'flip' during the isolation burst")
    parser.add_argument("--storm-cycles", type=int, default=25, help="load+unload cycles during the storm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/reliability/load.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lofit-load-"))
    try:
        if args.url:
            if not (args.key and args.admin_key):
                parser.error("--url needs --key and --admin-key")
            tallies = asyncio.run(run(args.url, args.key, args.admin_key, args, work))
        else:
            key, admin_key = secrets.token_hex(8), secrets.token_hex(8)
            adapters = work / "adapters"
            adapters.mkdir()
            shutil.copytree(SHIPPED, adapters / "truthfulqa")
            with started_server(adapters, key, admin_key) as url:
                tallies = asyncio.run(run(url, key, admin_key, args, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'phase':<10} {'requests':>8} {'errors':>6} {'mismatches':>10} {'seconds':>8}  notes")
    for t in tallies:
        print(f"{t.phase:<10} {t.requests:>8} {sum(t.errors.values()):>6} {len(t.mismatches):>10} "
              f"{t.seconds:>8.1f}  {json.dumps(t.extra)}")
        for error, n in t.errors.items():
            print(f"    error x{n}: {error}")
        for m in t.mismatches[:5]:
            print(f"    mismatch: {m}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps([{"phase": t.phase, "requests": t.requests, "errors": dict(t.errors),
                                     "mismatches": t.mismatches, "seconds": round(t.seconds, 2), **t.extra}
                                    for t in tallies], indent=2, default=str))
    print(f"wrote {args.out}")
    sys.exit(1 if any(t.errors or t.mismatches for t in tallies) else 0)


if __name__ == "__main__":
    main()
