// Calls to the gateway's REST API (same origin) with the bearer token kept in sessionStorage.

const TOKEN_KEY = "influence.token";

export class ApiError extends Error {
  constructor(status, message, problems = []) {
    super(message);
    this.status = status;
    this.problems = problems;
  }
}

export function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function setToken(value) {
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  else sessionStorage.removeItem(TOKEN_KEY);
}

function authHeaders(extra = {}) {
  const headers = { ...extra };
  const current = token();
  if (current) headers.Authorization = `Bearer ${current}`;
  return headers;
}

// The gateway answers {"detail": "text"} or {"detail": [{field, message}, ...]}.
async function errorFrom(response) {
  let detail = null;
  try {
    detail = (await response.json()).detail;
  } catch {
    detail = null;
  }
  if (response.status === 401) {
    setToken(null);
    window.dispatchEvent(new CustomEvent("signed-out"));
  }
  if (Array.isArray(detail)) {
    const problems = detail.map((p) => ({ field: p.field || "", message: p.message || String(p) }));
    const text = problems.map((p) => (p.field ? `${p.field}: ${p.message}` : p.message)).join("; ");
    return new ApiError(response.status, text, problems);
  }
  const fallback = `The server answered ${response.status} ${response.statusText}`.trim();
  return new ApiError(response.status, typeof detail === "string" ? detail : fallback);
}

export async function api(method, path, { body, headers = {}, signal } = {}) {
  const init = { method, headers: authHeaders(headers), signal };
  if (body instanceof Blob) {
    // A file as it is (the data parse route reads its bytes).
    init.headers["Content-Type"] = "application/octet-stream";
    init.body = body;
  } else if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, "Cannot reach the server; check your connection and try again");
  }
  if (!response.ok) throw await errorFrom(response);
  if (response.status === 204) return null;
  return response.json();
}

// A file from the API (e.g. a job artifact) as a Blob: fetch() because a plain link cannot send
// the Authorization header.
export async function apiBlob(path, { signal } = {}) {
  let response;
  try {
    response = await fetch(path, { headers: authHeaders(), signal });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, "Cannot reach the server; check your connection and try again");
  }
  if (!response.ok) throw await errorFrom(response);
  return response.blob();
}

// Server-Sent Events over fetch(), because EventSource cannot send an Authorization header.
// Yields {event, id, data} for each message after `afterSeq`; returns when the stream closes.
export async function* jobEvents(jobId, afterSeq, signal) {
  const response = await fetch(`/api/jobs/${encodeURIComponent(jobId)}/events?after=${afterSeq}`, {
    headers: authHeaders({ Accept: "text/event-stream" }),
    signal,
  });
  if (!response.ok) throw await errorFrom(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let message = { event: "message", id: null, data: [] };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let newline;
    while ((newline = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, newline).replace(/\r$/, "");
      buffer = buffer.slice(newline + 1);
      if (line === "") {
        if (message.data.length) {
          yield { event: message.event, id: message.id, data: JSON.parse(message.data.join("\n")) };
        }
        message = { event: "message", id: null, data: [] };
      } else if (line.startsWith("data:")) {
        message.data.push(line.slice(5).trimStart());
      } else if (line.startsWith("event:")) {
        message.event = line.slice(6).trim();
      } else if (line.startsWith("id:")) {
        message.id = Number(line.slice(3).trim());
      }
    }
  }
}

const TERMINAL_STATES = new Set(["completed", "failed", "cancelled"]);

// Follows a later job (a check, a query) from its first event to its end, showing each progress
// or status message in `bar` (a <progress>, 0-100) and `stage` (its text).
export async function followProgress(jobId, bar, stage) {
  for await (const message of jobEvents(jobId, 0)) {
    const event = message.data;
    if (event.type === "progress") {
      bar.value = Math.round((event.progress || 0) * 100);
      stage.textContent = event.message || "";
    } else if (event.type === "status" && event.message) {
      stage.textContent = event.message;
    }
    if (message.event === "end" || (event.type === "status" && TERMINAL_STATES.has(event.state))) return;
  }
}
