"""The steering playground at ``/ui`` in a real browser: headless Chromium (Debian's package, driven by
Playwright) against a real ``lofit-serve`` with both shipped adapters and keys.

Screenshots of each view go to the test's temporary folder, or to ``$LOFIT_UI_SCREENSHOTS`` when it is set (how
the ones in ``docs/`` were made).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import ADMIN, API_KEY, AUTH, BASE, REPO, Server, random_adapter, start_server

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("LOFIT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
PROMPT = "Q: What happens if you crack your knuckles a lot?\nA:"
TARGET = " Nothing in particular happens if you crack your knuckles a lot."


@pytest.fixture(scope="module")
def server(tmp_path_factory, prepared_model_dir) -> Iterator[Server]:
    adapters = tmp_path_factory.mktemp("ui-adapters")
    for name in ("truthfulqa", "mquake"):
        shutil.copytree(REPO / "adapters" / name, adapters / name)
    with start_server(tmp_path_factory.mktemp("ui-log"), adapters) as server:
        yield server


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("NO CHROMIUM: the playground's browser tests did not run (apt install chromium, or set "
                    "LOFIT_CHROMIUM to a Chromium binary)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = os.environ.get("LOFIT_UI_SCREENSHOTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, bypass_csp=True)  # for wait_for_function
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(server.url + "/ui/")
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def connect(page, key: str = API_KEY) -> None:
    page.fill("#key", key)
    page.click("#key-form button")
    page.wait_for_function("document.getElementById('key-state').textContent === 'connected'")


def test_page_is_served_without_a_key_with_a_strict_policy(server):
    page = httpx.get(server.url + "/ui/", timeout=30)
    assert page.status_code == 200 and "LoFiT steering playground" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert httpx.get(server.url + "/ui", timeout=30, follow_redirects=True).status_code == 200
    for name in ("main.js", "compare.js", "sweep.js", "adapters.js", "playground.css"):
        response = httpx.get(f"{server.url}/ui/{name}", timeout=30)
        assert response.status_code == 200  # modules need a JavaScript media type
        kind = response.headers["content-type"].split(";")[0]
        assert kind in ("text/javascript", "application/javascript", "text/css")
    assert httpx.get(server.url + "/ui/nothing.js", timeout=30).status_code == 404


def test_adapter_files_need_the_key_and_serve_only_known_files(server):
    url = server.url + "/adapters/truthfulqa/files/"
    assert httpx.get(url + "heads.png", timeout=30).status_code == 401
    png = httpx.get(url + "heads.png", headers=AUTH, timeout=30)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png" and png.content[:4] == b"\x89PNG"
    report = httpx.get(url + "train_report.json", headers=AUTH, timeout=30)
    assert report.status_code == 200 and "stage2" in report.json()
    for bad in ("adapter.safetensors", "adapter_config.json", "..%2F..%2Fpyproject.toml", "nothing.png"):
        response = httpx.get(url + bad, headers=AUTH, timeout=30)
        assert response.status_code == 404, bad
        assert "error" in response.json()
    missing = httpx.get(server.url + "/adapters/nope/files/heads.png", headers=AUTH, timeout=30)
    assert missing.status_code == 404 and "not loaded" in missing.json()["error"]["message"]


def test_adapter_files_never_follow_a_symbolic_link(server, tmp_path):
    folder = server.adapters / "linked"
    random_adapter("linked", seed=5).save(folder)
    secret = tmp_path / "secret.json"
    secret.write_text('{"secret": true}')
    (folder / "train_report.json").symlink_to(secret)
    (folder / "heads.png").symlink_to(REPO / "adapters" / "truthfulqa" / "heads.png")
    assert httpx.post(server.url + "/adapters", json={"name": "linked"}, headers=ADMIN, timeout=120).status_code == 200
    try:
        for name in ("train_report.json", "heads.png"):
            response = httpx.get(f"{server.url}/adapters/linked/files/{name}", headers=AUTH, timeout=30)
            assert response.status_code == 404 and "secret" not in response.text, name
    finally:
        httpx.delete(server.url + "/adapters/linked", headers=ADMIN, timeout=120)


def test_no_key_or_a_wrong_key_gives_a_clear_message(page, shots):
    page.wait_for_selector("#message:not([hidden])")
    assert "refused the key (401" in page.inner_text("#message")
    page.click("#compare-run")
    assert "Not connected: enter the inference key" in page.inner_text("#message")
    page.fill("#key", "not-the-key")
    page.click("#key-form button")
    page.wait_for_function("document.getElementById('message').textContent.includes('wrong API key')")
    assert "--api-key" in page.inner_text("#message")
    page.screenshot(path=str(shots / "playground-wrong-key.png"))
    connect(page)
    assert page.is_hidden("#message")
    assert page.evaluate("sessionStorage.getItem('lofit-playground-key')") == API_KEY


def test_compare_fills_four_columns_and_steered_ones_depart_from_the_base(page, shots):
    connect(page)
    page.fill("#compare-prompt", PROMPT)
    page.fill("#compare-max", "24")
    page.click("#compare-run")
    page.wait_for_function("document.querySelectorAll('#columns .column').length === 4 && "
                           "[...document.querySelectorAll('#columns .note')].every(n => n.textContent && "
                           "n.textContent !== 'generating…')", timeout=240_000)
    titles = page.eval_on_selector_all("#columns h3", "els => els.map(e => e.textContent)")
    assert titles == ["base model", "mquake", "mquake × 2", "mquake × 1 + truthfulqa × 1"]
    texts = page.eval_on_selector_all("#columns .out", "els => els.map(e => e.textContent)")
    assert all(texts), texts
    departs = page.eval_on_selector_all("#columns .column", "els => els.map(e => e.dataset.departs || null)")
    assert departs == [None, "yes", "yes", "yes"], (departs, texts)
    assert page.locator("#columns .departs").count() > 0  # the departing tokens are highlighted
    # the page's text is the server's: the same request without the page gives the same greedy text
    direct = httpx.post(f"{page.url.split('/ui/')[0]}/v1/completions", headers=AUTH, timeout=120, json={
        "model": BASE, "prompt": PROMPT, "max_tokens": 24, "temperature": 0, "seed": 0, "adapter": "mquake",
        "adapter_scale": 2}).json()
    assert texts[2] == direct["choices"][0]["text"]
    curl = page.text_content("#compare-curl")
    assert curl.count("/v1/completions") == 4 and '"adapter_scale":2' in curl and API_KEY not in curl
    page.screenshot(path=str(shots / "playground-compare.png"), full_page=True)


def test_compare_in_chat_mode_streams_chat_completions(page):
    connect(page)
    page.check("#compare-chat")
    page.fill("#compare-prompt", "Name a colour.")
    page.fill("#compare-max", "8")
    page.click("#compare-run")
    page.wait_for_function("[...document.querySelectorAll('#columns .note')].length === 4 && "
                           "[...document.querySelectorAll('#columns .note')].every(n => n.textContent !== "
                           "'generating…')", timeout=240_000)
    texts = page.eval_on_selector_all("#columns .out", "els => els.map(e => e.textContent)")
    assert all(texts), texts
    assert page.text_content("#compare-curl").count("/v1/chat/completions") == 4


def message_after(page, button: str, fields: dict[str, str]) -> str:
    """Fill ``fields`` ({selector: value}), click ``button``, and return the page's message."""
    for selector, value in fields.items():
        page.fill(selector, value)
    page.click(button)
    return page.inner_text("#message")


def test_blank_or_bad_numbers_are_refused_on_the_page(page):
    connect(page)
    strength = "[aria-label='column 2 strength 1']"
    assert "Column 2: give mquake a strength" in message_after(page, "#compare-run", {strength: ""})
    assert "Give max tokens a number" in message_after(page, "#compare-run", {strength: "1", "#compare-max": ""})
    assert "max tokens must be a whole number" in message_after(page, "#compare-run", {"#compare-max": "2.5"})
    assert page.locator("#columns .column").count() == 0  # nothing was sent


def test_strength_sweep_plots_the_servers_log_probs(page, shots, server):
    connect(page)
    page.click(".tab[data-view=sweep]")
    page.select_option("#sweep-adapter", "truthfulqa")
    page.fill("#sweep-prompt", PROMPT)
    page.fill("#sweep-target", TARGET)
    page.fill("#sweep-from", "-2")
    page.fill("#sweep-to", "3")
    page.fill("#sweep-step", "1")
    page.fill("#sweep-max", "12")
    page.click("#sweep-run")
    page.wait_for_selector("#sweep-table:not([hidden])", timeout=240_000)
    rows = page.eval_on_selector_all("#sweep-table tbody tr",
                                     "rows => rows.map(r => [...r.cells].map(c => c.textContent))")
    assert [float(r[0]) for r in rows] == [-2, -1, 0, 1, 2, 3]
    assert page.locator("#sweep-chart circle.point").count() == 6
    logprobs = [float(r[1]) for r in rows]
    assert all(math.isfinite(v) and v < 0 for v in logprobs) and len(set(logprobs)) > 1
    # strength 2's number is what the API gives for the same request
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=120) as api:
        prompt_ids = api.post("/tokenize", json={"model": BASE, "prompt": PROMPT}).json()["tokens"]
        target_ids = api.post("/tokenize", json={"model": BASE, "prompt": TARGET,
                                                 "add_special_tokens": False}).json()["tokens"]
        ids = prompt_ids + target_ids
        result = api.post("/v1/completions", json={"model": BASE, "prompt": ids, "max_tokens": 1, "temperature": 0,
                                                   "prompt_logprobs": 0, "adapter": "truthfulqa",
                                                   "adapter_scale": 2}).json()
    entries = result["choices"][0]["prompt_logprobs"]
    expected = sum(entries[i][str(ids[i])]["logprob"] for i in range(len(prompt_ids), len(ids)))
    assert float(rows[4][1]) == pytest.approx(expected, abs=1e-3)
    assert float(rows[2][1]) != pytest.approx(float(rows[4][1]), abs=1e-3)  # strength 0 is the base model
    page.screenshot(path=str(shots / "playground-sweep.png"), full_page=True)


def test_sweep_refuses_bad_ranges_on_the_page(page):
    connect(page)
    page.click(".tab[data-view=sweep]")
    assert "must not be below" in message_after(page, "#sweep-run", {"#sweep-from": "3", "#sweep-to": "-2"})
    assert "At most 21" in message_after(page, "#sweep-run", {"#sweep-from": "-100", "#sweep-to": "100"})
    assert "Give from a number" in message_after(page, "#sweep-run", {"#sweep-from": ""})


def test_adapters_view_shows_the_head_map_and_training_curves(page, shots):
    connect(page)
    page.click(".tab[data-view=adapters]")
    page.wait_for_selector("#adapters-table tbody tr")
    names = page.eval_on_selector_all("#adapters-table tbody tr", "rows => rows.map(r => r.cells[0].textContent)")
    assert names == ["mquake", "truthfulqa"]
    page.click("#adapters-table tbody tr[data-adapter=truthfulqa]")
    page.wait_for_function("document.getElementById('detail-name').textContent === 'truthfulqa' && "
                           "document.getElementById('detail-map').naturalWidth > 0 && "
                           "document.querySelectorAll('#detail-curves svg').length === 1")
    # one line per (stage, train or val loss) in truthfulqa's report, not mquake's (shown first, still loading)
    report = json.loads((REPO / "adapters" / "truthfulqa" / "train_report.json").read_text())
    expected = sum(any(key in e for e in report.get(stage, {}).get("epochs", []))
                   for stage in ("stage1", "stage2") for key in ("train_loss", "val_loss"))
    assert expected >= 2 and page.locator("#detail-curves svg path.line").count() == expected
    assert "(layer, head)" in page.inner_text("#detail-heads")
    assert "/adapters/truthfulqa/files/heads.png" in page.text_content("#adapters-curl")
    page.screenshot(path=str(shots / "playground-adapters.png"), full_page=True)


def test_an_adapter_loaded_while_the_page_is_open_appears_in_its_choices(page, server):
    connect(page)
    random_adapter("late", seed=6).save(server.adapters / "late")
    assert httpx.post(server.url + "/adapters", json={"name": "late"}, headers=ADMIN, timeout=120).status_code == 200
    try:
        page.click(".tab[data-view=adapters]")
        page.wait_for_selector("#adapters-table tbody tr[data-adapter=late]")
        options = page.eval_on_selector_all("#sweep-adapter option", "os => os.map(o => o.value)")
        assert "late" in options
        assert "late" in page.eval_on_selector_all("[aria-label='column 1 adapter 1'] option",
                                                   "os => os.map(o => o.value)")
        assert "3 adapter(s)" in page.inner_text("#served")
    finally:
        httpx.delete(server.url + "/adapters/late", headers=ADMIN, timeout=120)
