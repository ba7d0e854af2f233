// The LoFiT steering playground (served by lofit-serve at /ui). Plain browser JavaScript, no libraries.
// Every number it shows comes from the server's own API; each call is recorded as a curl command.
"use strict";

const KEY_STORE = "lofit-playground-key"; // sessionStorage: kept for this tab only
const COLORS = ["#2f6fdb", "#d9480f", "#2b8a3e", "#7048e8"];
const state = { base: null, adapters: [], connected: false, curl: { compare: [], sweep: [], adapters: [] } };
const $ = (id) => document.getElementById(id);

// ---------- API calls ----------

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

function headers() {
  const key = sessionStorage.getItem(KEY_STORE);
  const h = { "Content-Type": "application/json" };
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function curlOf(method, path, body) {
  const parts = ["curl -sS"];
  if (method !== "GET") parts.push("-X " + method);
  parts.push(shellQuote(location.origin + path));
  parts.push("-H \"Authorization: Bearer $LOFIT_API_KEY\"");
  if (body !== undefined) {
    parts.push("-H 'Content-Type: application/json'");
    parts.push("-d " + shellQuote(JSON.stringify(body)));
  }
  return parts.join(" \\\n  ");
}

function shellQuote(text) { return "'" + String(text).replace(/'/g, "'\\''") + "'"; }

async function failure(response) {
  let message = response.statusText || "request failed";
  try {
    const body = await response.json();
    message = (body.error && body.error.message) || body.detail || JSON.stringify(body);
  } catch (_) { /* not JSON */ }
  if (response.status === 401 || response.status === 403) {
    message = "The server refused the key (" + response.status + " " + message + "). Enter the inference key " +
      "the server was started with (--api-key) above.";
    showMessage(message);
  }
  return new ApiError(response.status, message);
}

// One call: records its curl line in `view`, returns the parsed JSON (or the Response for raw bodies).
async function api(view, method, path, body, raw) {
  state.curl[view].push(curlOf(method, path, body));
  renderCurl(view);
  const response = await fetch(path, { method, headers: headers(),
    body: body === undefined ? undefined : JSON.stringify(body) });
  if (!response.ok) throw await failure(response);
  return raw ? response : response.json();
}

// A streamed completion (server-sent events): calls onChunk(parsed) for every data line.
async function stream(view, path, body, onChunk) {
  const response = await api(view, "POST", path, body, true);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        const parsed = JSON.parse(data);
        if (parsed.error) throw new ApiError(parsed.error.code || 500, parsed.error.message);
        onChunk(parsed);
      }
    }
  }
}

function renderCurl(view) {
  $(view + "-curl").textContent = state.curl[view].join("\n\n");
}

function showMessage(text) {
  const box = $("message");
  box.textContent = text;
  box.hidden = !text;
}

// A number field's value; throws a message naming the field when it is blank, not a number or out of range.
function numberField(id, label, { integer = false, min = -Infinity, max = Infinity } = {}) {
  const raw = $(id).value.trim(), value = Number(raw);
  if (raw === "" || !Number.isFinite(value)) throw new Error("Give " + label + " a number.");
  if (integer && !Number.isInteger(value)) throw new Error(label + " must be a whole number.");
  if (value < min || value > max) throw new Error(label + " must be between " + min + " and " + max + ".");
  return value;
}

function requireConnection() {
  if (!state.connected) throw new Error("Not connected: enter the inference key above and press \"Use key\".");
}

// ---------- steering choices ----------

// {adapter, scale} or {adapters: {a: w, b: w}} or {} (base): the body fields that choose the steering.
function steeringFields(choice) {
  const picked = choice.filter((c) => c.name);
  if (picked.length === 0) return {};
  if (picked.length === 1) return { adapter: picked[0].name, adapter_scale: picked[0].weight };
  const mix = {};
  for (const c of picked) mix[c.name] = (mix[c.name] || 0) + c.weight;
  return { adapters: mix };
}

function steeringLabel(choice) {
  const picked = choice.filter((c) => c.name);
  if (picked.length === 0) return "base model";
  return picked.map((c) => (c.weight === 1 && picked.length === 1 ? c.name : c.name + " × " + c.weight)).join(" + ");
}

function adapterOptions(select, withNone, chosen) {
  select.textContent = "";
  if (withNone) select.append(new Option("— none —", ""));
  for (const a of state.adapters) select.append(new Option(a.name, a.name));
  if (chosen !== undefined) select.value = chosen;
}

// ---------- Compare ----------

function defaultColumns() {
  const [a, b] = [state.adapters[0] && state.adapters[0].name, state.adapters[1] && state.adapters[1].name];
  if (!a) return [[]];
  return [
    [],
    [{ name: a, weight: 1 }],
    [{ name: a, weight: 2 }],
    b ? [{ name: a, weight: 1 }, { name: b, weight: 1 }] : [{ name: a, weight: -1 }],
  ];
}

function buildColumnSetup() {
  const root = $("columns-setup");
  root.textContent = "";
  defaultColumns().forEach((choice, i) => {
    const box = document.createElement("div");
    box.className = "column-setup";
    box.dataset.column = i;
    const title = document.createElement("strong");
    title.textContent = "Column " + (i + 1);
    box.append(title);
    for (let j = 0; j < 2; j++) {
      const row = document.createElement("div");
      row.className = "row";
      const select = document.createElement("select");
      select.className = "pick";
      select.setAttribute("aria-label", "column " + (i + 1) + " adapter " + (j + 1));
      adapterOptions(select, true, choice[j] ? choice[j].name : "");
      const weight = document.createElement("input");
      weight.type = "number";
      weight.step = "0.25";
      weight.className = "weight";
      weight.value = choice[j] ? choice[j].weight : 1;
      weight.setAttribute("aria-label", "column " + (i + 1) + " strength " + (j + 1));
      row.append(j === 0 ? "adapter" : "+ mix", select, "×", weight);
      box.append(row);
    }
    const use = document.createElement("label");
    const check = document.createElement("input");
    check.type = "checkbox";
    check.className = "use";
    check.checked = true;
    use.append(check, "show");
    box.append(use);
    root.append(box);
  });
}

// The ticked columns' choices [[{name, weight}, {name, weight}], ...]; throws on a blank or non-numeric strength.
function columnChoices() {
  return [...document.querySelectorAll(".column-setup")].filter((box) => box.querySelector(".use").checked)
    .map((box, i) => [...box.querySelectorAll(".row")].map((row) => {
      const name = row.querySelector(".pick").value, raw = row.querySelector(".weight").value.trim();
      const weight = Number(raw);
      if (name && (raw === "" || !Number.isFinite(weight))) {
        throw new Error("Column " + (Number(box.dataset.column) + 1) + ": give " + name + " a strength (a number).");
      }
      return { name, weight };
    }));
}

// The text a streamed chunk adds (usually one token; special tokens such as the end of turn are not text).
function pieceOf(chunk, chat) {
  const choice = chunk.choices && chunk.choices[0];
  if (!choice) return "";
  return (chat ? choice.delta && choice.delta.content : choice.text) || "";
}

function renderColumn(column) {
  const out = column.el.querySelector(".out");
  out.textContent = "";
  column.tokens.forEach((token, i) => {
    const span = document.createElement("span");
    span.textContent = token;
    if (column.departsAt !== null && i >= column.departsAt) span.className = "departs";
    out.append(span);
  });
}

function markDepartures(columns) {
  const base = columns.find((c) => c.isBase);
  for (const c of columns) {
    const note = c.el.querySelector(".note");
    if (c.failed) continue;
    if (c.isBase) { note.textContent = "the reference for the other columns"; continue; }
    if (!base || base.failed) { note.textContent = "no base column to compare with"; continue; }
    let i = 0;
    while (i < c.tokens.length && i < base.tokens.length && c.tokens[i] === base.tokens[i]) i++;
    const same = i === c.tokens.length && i === base.tokens.length;
    c.departsAt = same ? null : i;
    c.el.dataset.departs = same ? "no" : "yes";
    note.textContent = same ? "same as the base model" : "departs from the base model at token " + (i + 1);
    renderColumn(c);
  }
}

async function runCompare(event) {
  event.preventDefault();
  showMessage("");
  const prompt = $("compare-prompt").value;
  const chat = $("compare-chat").checked;
  let choices, sampling;
  try {
    requireConnection();
    if (!prompt.trim()) throw new Error("Write a prompt first.");
    choices = columnChoices().slice(0, 4);
    if (!choices.length) throw new Error("Tick at least one column.");
    sampling = { max_tokens: numberField("compare-max", "max tokens", { integer: true, min: 1 }),
      temperature: numberField("compare-temp", "temperature", { min: 0, max: 2 }), stream: true };
    if ($("compare-seed").value.trim() !== "") {
      sampling.seed = numberField("compare-seed", "seed", { integer: true, min: 0 });
    }
  } catch (err) { showMessage(err.message); return; }
  state.curl.compare = [];
  const root = $("columns");
  root.textContent = "";
  const columns = choices.map((choice) => {
    const el = document.createElement("div");
    el.className = "column";
    const h = document.createElement("h3");
    h.textContent = steeringLabel(choice);
    const out = document.createElement("div");
    out.className = "out";
    const note = document.createElement("div");
    note.className = "note";
    note.textContent = "generating…";
    el.append(h, out, note);
    root.append(el);
    return { el, choice, tokens: [], departsAt: null, failed: false, isBase: false };
  });
  const reference = columns.find((c) => c.choice.every((x) => !x.name || x.weight === 0));
  if (reference) reference.isBase = true; // the first base-model column is what the others are compared with
  $("compare-run").disabled = true;
  await Promise.all(columns.map(async (column) => {
    const body = chat
      ? { model: state.base, messages: [{ role: "user", content: prompt }] }
      : { model: state.base, prompt };
    Object.assign(body, sampling, steeringFields(column.choice));
    try {
      await stream("compare", chat ? "/v1/chat/completions" : "/v1/completions", body, (chunk) => {
        const piece = pieceOf(chunk, chat);
        if (piece) {
          column.tokens.push(piece);
          renderColumn(column);
        }
      });
    } catch (err) {
      column.failed = true;
      const note = column.el.querySelector(".note");
      note.textContent = err.message;
      note.classList.add("error");
    }
  }));
  markDepartures(columns);
  $("compare-run").disabled = false;
}

// ---------- Strength sweep ----------

function strengths() {
  const from = numberField("sweep-from", "from"), to = numberField("sweep-to", "to");
  const step = numberField("sweep-step", "step");
  if (step <= 0) throw new Error("The step must be positive.");
  if (to < from) throw new Error("'to' must not be below 'from'.");
  const n = Math.floor((to - from) / step + 1e-9) + 1;
  if (n > 21) throw new Error("At most 21 strengths: widen the step.");
  return Array.from({ length: n }, (_, i) => Math.round((from + i * step) * 1e6) / 1e6);
}

async function tokenize(view, text, chat, special) {
  const body = chat
    ? { model: state.base, messages: [{ role: "user", content: text }], add_generation_prompt: true }
    : { model: state.base, prompt: text, add_special_tokens: special };
  return (await api(view, "POST", "/tokenize", body)).tokens;
}

// log p(target | prompt) at one strength: the sum of the server's prompt log-probs over the target's tokens.
async function targetLogprob(promptIds, targetIds, fields) {
  const body = Object.assign({ model: state.base, prompt: promptIds.concat(targetIds), max_tokens: 1,
    temperature: 0, prompt_logprobs: 0 }, fields);
  const result = await api("sweep", "POST", "/v1/completions", body);
  const entries = result.choices[0].prompt_logprobs;
  let total = 0;
  for (let i = promptIds.length; i < entries.length; i++) {
    const entry = entries[i][String(promptIds.concat(targetIds)[i])];
    total += entry.logprob;
  }
  return total;
}

async function runSweep(event) {
  event.preventDefault();
  showMessage("");
  const tbody = $("sweep-table").querySelector("tbody");
  tbody.textContent = "";
  $("sweep-table").hidden = true;
  $("sweep-chart").textContent = "";
  const adapter = $("sweep-adapter").value;
  const prompt = $("sweep-prompt").value, target = $("sweep-target").value, chat = $("sweep-chat").checked;
  let points, maxTokens;
  try {
    requireConnection();
    points = strengths();
    maxTokens = numberField("sweep-max", "max tokens", { integer: true, min: 1 });
    if (!adapter) throw new Error("No adapter is loaded on this server.");
    if (!prompt.trim() || !target) throw new Error("Give a prompt and a target continuation.");
  } catch (err) { showMessage(err.message); return; }
  state.curl.sweep = [];
  $("sweep-run").disabled = true;
  try {
    const promptIds = await tokenize("sweep", prompt, chat, true);
    const targetIds = await tokenize("sweep", target, false, false);
    const rows = await Promise.all(points.map(async (s) => {
      const fields = { adapter, adapter_scale: s };
      const [gen, logprob] = await Promise.all([
        api("sweep", "POST", "/v1/completions", Object.assign({ model: state.base, prompt: promptIds,
          max_tokens: maxTokens, temperature: 0 }, fields)),
        targetLogprob(promptIds, targetIds, fields),
      ]);
      return { strength: s, text: gen.choices[0].text, logprob };
    }));
    for (const row of rows) {
      const tr = tbody.insertRow();
      const cells = [row.strength, row.logprob.toFixed(3), row.text];
      cells.forEach((value, i) => {
        const td = tr.insertCell();
        td.textContent = value;
        td.className = i === 2 ? "text" : "num";
      });
    }
    $("sweep-table").hidden = false;
    $("sweep-chart").append(lineChart([{ name: "log p(target) — " + adapter, color: COLORS[0],
      points: rows.map((r) => [r.strength, r.logprob]) }], "strength", "log p(target)"));
  } catch (err) {
    showMessage(err.message);
  } finally {
    $("sweep-run").disabled = false;
  }
}

// ---------- charts (SVG) ----------

function svg(tag, attrs, text) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

function niceTicks(lo, hi, count) {
  if (lo === hi) { lo -= 1; hi += 1; }
  const step = (hi - lo) / (count - 1);
  return Array.from({ length: count }, (_, i) => lo + i * step);
}

// series: [{name, color, points: [[x, y], ...]}]; one <circle class="point"> per point.
function lineChart(series, xLabel, yLabel) {
  const W = 640, H = 300, L = 64, R = 16, T = 28, B = 44;
  const all = series.flatMap((s) => s.points);
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { y0 -= 1; y1 += 1; }
  const pad = (y1 - y0) * 0.08;
  y0 -= pad; y1 += pad;
  const X = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const Y = (y) => H - B - ((y - y0) / (y1 - y0)) * (H - T - B);
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": yLabel + " against " + xLabel });
  root.append(svg("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis" }));
  root.append(svg("line", { x1: L, y1: T, x2: L, y2: H - B, class: "axis" }));
  const distinct = [...new Set(xs)].sort((a, b) => a - b);
  for (const t of distinct.length <= 12 ? distinct : niceTicks(x0, x1, 6)) {
    root.append(svg("text", { x: X(t), y: H - B + 16, "text-anchor": "middle", class: "tick" }, +t.toFixed(2)));
  }
  for (const t of niceTicks(y0, y1, 5)) {
    root.append(svg("text", { x: L - 6, y: Y(t) + 4, "text-anchor": "end", class: "tick" }, +t.toFixed(2)));
  }
  root.append(svg("text", { x: (L + W - R) / 2, y: H - 8, "text-anchor": "middle", class: "tick" }, xLabel));
  root.append(svg("text", { x: 14, y: (T + H - B) / 2, "text-anchor": "middle", class: "tick",
    transform: `rotate(-90 14 ${(T + H - B) / 2})` }, yLabel));
  series.forEach((s, k) => {
    const d = s.points.map((p, i) => (i ? "L" : "M") + X(p[0]).toFixed(1) + " " + Y(p[1]).toFixed(1)).join(" ");
    root.append(svg("path", { d, class: "line", stroke: s.color }));
    for (const p of s.points) {
      const dot = svg("circle", { cx: X(p[0]), cy: Y(p[1]), r: 3.5, fill: s.color, class: "point" });
      dot.append(svg("title", {}, `${xLabel} ${p[0]}: ${yLabel} ${p[1].toFixed(4)}`));
      root.append(dot);
    }
    root.append(svg("text", { x: L + 8 + k * 150, y: 16, fill: s.color, "font-size": 12 }, s.name));
  });
  return root;
}

// ---------- Adapters ----------

// GET /adapters; the compare and sweep choices and the header follow the new list.
async function loadAdapters(view) {
  const listing = await api(view, "GET", "/adapters");
  state.adapters = listing.adapters;
  $("served").textContent = "serving " + state.base + " with " + state.adapters.length + " adapter(s)";
  for (const select of document.querySelectorAll("#columns-setup .pick")) {
    const chosen = select.value;
    adapterOptions(select, true, state.adapters.some((a) => a.name === chosen) ? chosen : "");
  }
  const sweep = $("sweep-adapter"), current = sweep.value;
  const preferred = state.adapters.find((a) => a.task === "truthfulqa"); // the default prompt is a TruthfulQA one
  adapterOptions(sweep, false);
  if (state.adapters.some((a) => a.name === current)) sweep.value = current;
  else if (preferred) sweep.value = preferred.name;
  return listing;
}

async function renderAdapters() {
  showMessage("");
  state.curl.adapters = [];
  let listing;
  try {
    requireConnection();
    listing = await loadAdapters("adapters");
  } catch (err) { showMessage(err.message); return; }
  const tbody = $("adapters-table").querySelector("tbody");
  tbody.textContent = "";
  for (const a of listing.adapters) {
    const tr = tbody.insertRow();
    tr.dataset.adapter = a.name;
    const metrics = Object.entries(a.metrics || {}).filter(([, v]) => typeof v === "number")
      .map(([k, v]) => k + " " + (Math.abs(v) < 10 ? v.toFixed(3) : v)).join(", ");
    for (const value of [a.name, a.task || "—", a.num_heads, a.base_model, a.fingerprint.slice(0, 19) + "…",
      metrics || "—"]) {
      tr.insertCell().textContent = value;
    }
    tr.cells[4].title = a.fingerprint;
    tr.addEventListener("click", () => showAdapter(a));
  }
  const skipped = Object.entries(listing.skipped || {});
  $("adapters-skipped").textContent = skipped.length
    ? "Skipped at start: " + skipped.map(([n, why]) => n + " (" + why + ")").join("; ") : "";
  if (listing.adapters.length) showAdapter(listing.adapters[0]);
}

// Shows one adapter's details; a later click wins over an earlier one still loading.
async function showAdapter(a) {
  const turn = (state.shown = (state.shown || 0) + 1);
  const current = () => turn === state.shown;
  for (const tr of $("adapters-table").querySelectorAll("tbody tr")) {
    tr.classList.toggle("chosen", tr.dataset.adapter === a.name);
  }
  $("adapter-detail").hidden = false;
  $("detail-name").textContent = a.name;
  $("detail-heads").textContent = a.num_heads + " heads (layer, head): " +
    a.heads.map((h) => "(" + h[0] + "," + h[1] + ")").join(" ") + " · content " + a.content_sha256.slice(0, 12);
  const img = $("detail-map");
  if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
  img.removeAttribute("src");
  img.hidden = true;
  const base = "/adapters/" + encodeURIComponent(a.name) + "/files/";
  try {
    const response = await api("adapters", "GET", base + "heads.png", undefined, true);
    const blob = await response.blob();
    if (!current()) return;
    img.src = URL.createObjectURL(blob);
    img.hidden = false;
    $("detail-map-caption").textContent = "heads.png: the stage-1 ranking and the chosen heads";
  } catch (err) {
    if (!current()) return;
    $("detail-map-caption").textContent = err.status === 404 ? "this adapter has no heads.png" : err.message;
  }
  const curves = $("detail-curves");
  curves.textContent = "";
  try {
    const report = await api("adapters", "GET", base + "train_report.json");
    if (!current()) return;
    const series = [];
    for (const [stage, label] of [["stage1", "stage 1"], ["stage2", "stage 2"]]) {
      const epochs = (report[stage] && report[stage].epochs) || [];
      for (const [key, what] of [["train_loss", "train"], ["val_loss", "val"]]) {
        const points = epochs.filter((e) => Number.isFinite(e[key])).map((e) => [e.epoch, e[key]]);
        if (points.length) series.push({ name: label + " " + what, color: COLORS[series.length % 4], points });
      }
    }
    if (series.length) curves.append(lineChart(series, "epoch", "loss"));
    $("detail-curves-caption").textContent = series.length ? "training curves (train_report.json)"
      : "train_report.json has no epoch records";
  } catch (err) {
    if (!current()) return;
    $("detail-curves-caption").textContent = err.status === 404 ? "this adapter has no train_report.json"
      : err.message;
  }
}

// ---------- start ----------

// Copy a curl box; browsers allow the clipboard only on https or localhost, so elsewhere the text is selected.
async function copy(button) {
  const box = $(button.dataset.for);
  try {
    await navigator.clipboard.writeText(box.textContent);
    button.textContent = "Copied";
  } catch (_) {
    const range = document.createRange();
    range.selectNodeContents(box);
    getSelection().removeAllRanges();
    getSelection().addRange(range);
    button.textContent = "Selected: press Ctrl+C (the clipboard needs https or localhost)";
  }
  setTimeout(() => { button.textContent = "Copy"; }, 4000);
}

function selectView(name) {
  for (const tab of document.querySelectorAll(".tab")) tab.setAttribute("aria-selected", tab.dataset.view === name);
  for (const view of document.querySelectorAll(".view")) view.hidden = view.id !== "view-" + name;
  if (name === "adapters") renderAdapters();
}

async function connect() {
  showMessage("");
  state.curl.compare = [];
  try {
    const models = await api("compare", "GET", "/v1/models");
    const base = models.data.find((m) => !m.parent) || models.data[0];
    state.base = base.id;
    await loadAdapters("compare");
    buildColumnSetup();
    state.connected = true;
    $("key-state").textContent = "connected";
    return true;
  } catch (err) {
    state.connected = false;
    $("key-state").textContent = "not connected";
    showMessage(err.message);
    return false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("key").value = sessionStorage.getItem(KEY_STORE) || "";
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("key").value.trim();
    if (key) sessionStorage.setItem(KEY_STORE, key); else sessionStorage.removeItem(KEY_STORE);
    connect();
  });
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => selectView(tab.dataset.view));
  for (const button of document.querySelectorAll(".copy")) button.addEventListener("click", () => copy(button));
  $("compare-form").addEventListener("submit", runCompare);
  $("sweep-form").addEventListener("submit", runSweep);
  $("adapters-refresh").addEventListener("click", renderAdapters);
  connect();
});
