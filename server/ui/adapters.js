// The Adapters view: every loaded adapter, and one adapter's head map and training curves.

import { $, api, requireConnection, showMessage, state } from "./api.js";
import { loadAdapters } from "./steering.js";
import { COLORS, lineChart } from "./chart.js";

export async function renderAdapters() {
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
export async function showAdapter(a) {
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
