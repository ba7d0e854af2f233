// HTTP calls to the server (with the key the user gave), their curl lines, messages and form checks.

export const KEY_STORE = "lofit-playground-key"; // sessionStorage: kept for this tab only
export const state = { base: null, adapters: [], connected: false, curl: { compare: [], sweep: [], adapters: [] } };
export const $ = (id) => document.getElementById(id);

// ---------- API calls ----------

export class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

export function headers() {
  const key = sessionStorage.getItem(KEY_STORE);
  const h = { "Content-Type": "application/json" };
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

export function curlOf(method, path, body) {
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

export function shellQuote(text) { return "'" + String(text).replace(/'/g, "'\\''") + "'"; }

export async function failure(response) {
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
export async function api(view, method, path, body, raw) {
  state.curl[view].push(curlOf(method, path, body));
  renderCurl(view);
  const response = await fetch(path, { method, headers: headers(),
    body: body === undefined ? undefined : JSON.stringify(body) });
  if (!response.ok) throw await failure(response);
  return raw ? response : response.json();
}

// A streamed completion (server-sent events): calls onChunk(parsed) for every data line.
export async function stream(view, path, body, onChunk) {
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

export function renderCurl(view) {
  $(view + "-curl").textContent = state.curl[view].join("\n\n");
}

export function showMessage(text) {
  const box = $("message");
  box.textContent = text;
  box.hidden = !text;
}

// A number field's value; throws a message naming the field when it is blank, not a number or out of range.
export function numberField(id, label, { integer = false, min = -Infinity, max = Infinity } = {}) {
  const raw = $(id).value.trim(), value = Number(raw);
  if (raw === "" || !Number.isFinite(value)) throw new Error("Give " + label + " a number.");
  if (integer && !Number.isInteger(value)) throw new Error(label + " must be a whole number.");
  if (value < min || value > max) throw new Error(label + " must be between " + min + " and " + max + ".");
  return value;
}

export function requireConnection() {
  if (!state.connected) throw new Error("Not connected: enter the inference key above and press \"Use key\".");
}
