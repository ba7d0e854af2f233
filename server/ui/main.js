// The LoFiT steering playground (lofit-serve serves it at /ui): plain browser modules, no library and no build
// step. Every number it shows comes from the server's own API, and each call is listed as a curl command.
//
// main.js: start-up: the key, the tabs, the copy buttons, and the first connection.

import { $, KEY_STORE, api, showMessage, state } from "./api.js";
import { loadAdapters } from "./steering.js";
import { buildColumnSetup, runCompare } from "./compare.js";
import { runSweep } from "./sweep.js";
import { renderAdapters } from "./adapters.js";

// Copy a curl box; browsers allow the clipboard only on https or localhost, so elsewhere the text is selected.
export async function copy(button) {
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

export function selectView(name) {
  for (const tab of document.querySelectorAll(".tab")) tab.setAttribute("aria-selected", tab.dataset.view === name);
  for (const view of document.querySelectorAll(".view")) view.hidden = view.id !== "view-" + name;
  if (name === "adapters") renderAdapters();
}

export async function connect() {
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
