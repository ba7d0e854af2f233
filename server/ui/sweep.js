// The Strength sweep view: greedy outputs and log p(target) of one adapter over a range of strengths.

import { $, api, numberField, requireConnection, showMessage, state } from "./api.js";
import { COLORS, lineChart } from "./chart.js";

export function strengths() {
  const from = numberField("sweep-from", "from"), to = numberField("sweep-to", "to");
  const step = numberField("sweep-step", "step");
  if (step <= 0) throw new Error("The step must be positive.");
  if (to < from) throw new Error("'to' must not be below 'from'.");
  const n = Math.floor((to - from) / step + 1e-9) + 1;
  if (n > 21) throw new Error("At most 21 strengths: widen the step.");
  return Array.from({ length: n }, (_, i) => Math.round((from + i * step) * 1e6) / 1e6);
}

export async function tokenize(view, text, chat, special) {
  const body = chat
    ? { model: state.base, messages: [{ role: "user", content: text }], add_generation_prompt: true }
    : { model: state.base, prompt: text, add_special_tokens: special };
  return (await api(view, "POST", "/tokenize", body)).tokens;
}

// log p(target | prompt) at one strength: the sum of the server's prompt log-probs over the target's tokens.
export async function targetLogprob(promptIds, targetIds, fields) {
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

export async function runSweep(event) {
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
