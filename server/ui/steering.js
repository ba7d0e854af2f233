// What a request is steered by: the body fields and labels of a choice, and the adapter lists.

import { $, api, state } from "./api.js";

// {adapter, scale} or {adapters: {a: w, b: w}} or {} (base): the body fields that choose the steering.
export function steeringFields(choice) {
  const picked = choice.filter((c) => c.name);
  if (picked.length === 0) return {};
  if (picked.length === 1) return { adapter: picked[0].name, adapter_scale: picked[0].weight };
  const mix = {};
  for (const c of picked) mix[c.name] = (mix[c.name] || 0) + c.weight;
  return { adapters: mix };
}

export function steeringLabel(choice) {
  const picked = choice.filter((c) => c.name);
  if (picked.length === 0) return "base model";
  return picked.map((c) => (c.weight === 1 && picked.length === 1 ? c.name : c.name + " × " + c.weight)).join(" + ");
}

export function adapterOptions(select, withNone, chosen) {
  select.textContent = "";
  if (withNone) select.append(new Option("— none —", ""));
  for (const a of state.adapters) select.append(new Option(a.name, a.name));
  if (chosen !== undefined) select.value = chosen;
}

// GET /adapters; the compare and sweep choices and the header follow the new list.
export async function loadAdapters(view) {
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
