// The Compare view: one prompt, up to four steering choices streamed side by side.

import { $, numberField, requireConnection, showMessage, state, stream } from "./api.js";
import { adapterOptions, steeringFields, steeringLabel } from "./steering.js";

export function defaultColumns() {
  const [a, b] = [state.adapters[0] && state.adapters[0].name, state.adapters[1] && state.adapters[1].name];
  if (!a) return [[]];
  return [
    [],
    [{ name: a, weight: 1 }],
    [{ name: a, weight: 2 }],
    b ? [{ name: a, weight: 1 }, { name: b, weight: 1 }] : [{ name: a, weight: -1 }],
  ];
}

export function buildColumnSetup() {
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
export function columnChoices() {
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
export function pieceOf(chunk, chat) {
  const choice = chunk.choices && chunk.choices[0];
  if (!choice) return "";
  return (chat ? choice.delta && choice.delta.content : choice.text) || "";
}

export function renderColumn(column) {
  const out = column.el.querySelector(".out");
  out.textContent = "";
  column.tokens.forEach((token, i) => {
    const span = document.createElement("span");
    span.textContent = token;
    if (column.departsAt !== null && i >= column.departsAt) span.className = "departs";
    out.append(span);
  });
}

export function markDepartures(columns) {
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

export async function runCompare(event) {
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
