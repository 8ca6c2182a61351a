// Ask: follow-up queries to a finished experiment's fine-tuned model (POST /api/jobs/{id}/queries).
// Type a prompt and see the model's answer with the training examples that most helped and most
// hurt it; select part of the answer (mouse, or Shift+arrows in the answer box) and attribute
// just those characters (a span: character offsets into the answer). Each query is a job with
// progress over SSE, like experiments; the experiment's earlier queries are listed below.

import { api, followProgress } from "../api.js";
import { announce, dateTime, el } from "../ui.js";

const TOP_K = 5;
const KEY_STEPS = { ArrowLeft: -1, ArrowRight: 1, Home: -Infinity, End: Infinity };

function queriesUrl(jobId, suffix = "") {
  return `/api/jobs/${encodeURIComponent(jobId)}/queries${suffix}`;
}

function examplesList(id, title, examples) {
  return el("div", { class: "ask-side" },
    el("h4", {}, title),
    examples.length ? el("ol", { id, class: "ask-examples" }, examples.map((x) => el("li", { "data-train-id": x.id },
      el("div", {}, el("code", {}, x.id), " ", el("span", { class: "num" }, `score ${x.score.toExponential(3)}`)),
      x.text ? el("div", { class: "help" }, el("q", { class: "train-prompt" }, x.text.prompt), " → ",
        el("q", { class: "train-answer" }, x.text.answer)) : null)))
      : el("p", { id, class: "help" }, "None."));
}

// The answer of one query: the text (selectable), what counted, and both example lists.
function answerView(outcome, onSpan) {
  const answerBox = el("textarea", { id: "ask-output", readonly: true, rows: 2,
    "aria-label": "The model's answer; select part of it to attribute only those characters" });
  answerBox.value = outcome.target;
  const spanButton = el("button", { type: "button", id: "ask-span", disabled: true }, "Attribute the selection");
  const selected = el("p", { id: "ask-selection", class: "help", "aria-live": "polite" },
    "Select part of the answer (drag with the mouse, or Shift+arrow keys) to attribute only those characters.");
  const selection = () => [answerBox.selectionStart, answerBox.selectionEnd];
  function showSelection() {
    const [start, end] = selection();
    spanButton.disabled = end <= start;
    if (end > start) selected.textContent = `Selected “${outcome.target.slice(start, end)}” (characters ${start}–${end}).`;
  }
  for (const name of ["select", "mouseup", "keyup"]) answerBox.addEventListener(name, showSelection);
  // A read-only box has no caret in every browser: arrows, Home and End move one here, and with
  // Shift they extend the selection from its anchor.
  answerBox.addEventListener("keydown", (event) => {
    const step = KEY_STEPS[event.key];
    if (step === undefined) return;
    event.preventDefault();
    const backward = answerBox.selectionDirection === "backward";
    const [anchor, moving] = backward
      ? [answerBox.selectionEnd, answerBox.selectionStart] : [answerBox.selectionStart, answerBox.selectionEnd];
    const next = Math.min(outcome.target.length, Math.max(0, moving + step));
    if (event.shiftKey) {
      answerBox.setSelectionRange(Math.min(anchor, next), Math.max(anchor, next), next < anchor ? "backward" : "forward");
    } else {
      answerBox.setSelectionRange(next, next);
    }
    showSelection();
  });
  spanButton.addEventListener("click", () => {
    const [start, end] = selection();
    if (end > start) onSpan(outcome, [start, end]);
  });
  const counted = outcome.span
    ? `Attributed: “${outcome.target.slice(outcome.span[0], outcome.span[1])}” (characters ${outcome.span[0]}–${outcome.span[1]}, ${outcome.span_tokens} tokens), loss ${outcome.loss.toFixed(3)}.`
    : `Attributed: the whole answer (${outcome.span_tokens} tokens), loss ${outcome.loss.toFixed(3)}.`;
  return el("div", { class: "ask-answer", "data-query-id": outcome.id },
    el("p", {}, el("strong", {}, "Prompt: "), el("q", { id: "ask-asked" }, outcome.prompt)),
    el("label", { for: "ask-output" }, "Answer"), answerBox,
    el("p", { id: "ask-counted", class: "help" }, counted),
    selected, el("div", { class: "actions" }, spanButton),
    el("div", { class: "ask-sides" },
      examplesList("ask-helpful", "Most helpful training examples", outcome.helpful),
      examplesList("ask-harmful", "Most harmful training examples", outcome.harmful)));
}

// The Ask card for a completed experiment.
export function askSection(jobId) {
  const prompt = el("textarea", { id: "ask-prompt", rows: 3, required: true, placeholder: "A new prompt for the fine-tuned model" });
  const run = el("button", { type: "submit", id: "ask-run" }, "Ask");
  const bar = el("progress", { id: "ask-progress", max: 100, value: 0 });
  const stage = el("p", { id: "ask-stage", class: "help" });
  const progressBox = el("div", { id: "ask-running", hidden: true },
    el("label", { for: "ask-progress" }, "Query progress"), el("div", { class: "progress-row" }, bar), stage);
  const error = el("p", { id: "ask-error", class: "error", role: "alert", hidden: true });
  const outcome = el("div", { id: "ask-result", hidden: true });
  const history = el("ol", { id: "ask-history" });
  const historyBox = el("div", { hidden: true }, el("h3", {}, "Earlier queries"), history);

  function showError(message) {
    error.textContent = message;
    error.hidden = !message;
  }

  function show(query) {
    const answer = query.result.results[0];
    outcome.replaceChildren(answerView(answer, (asked, span) =>
      submit({ prompt: asked.prompt, expected: asked.target, span })));
    outcome.hidden = false;
  }

  async function listEarlier() {
    const { queries } = await api("GET", queriesUrl(jobId));
    historyBox.hidden = queries.length === 0;
    history.replaceChildren(...queries.map((q) => {
      const asked = q.request?.queries?.[0] || {};
      const span = asked.span ? ` [${asked.span[0]}–${asked.span[1]}]` : "";
      return el("li", { "data-query-job-id": q.query_job_id },
        el("button", { type: "button", class: "ask-open", disabled: q.status !== "completed",
          onclick: async () => show(await api("GET", queriesUrl(jobId, `/${encodeURIComponent(q.query_job_id)}`))) },
        `${asked.prompt || q.query_job_id}${span}`),
        el("span", { class: "help" }, ` ${q.status}, ${dateTime(q.created_at)}`));
    }));
  }

  async function follow(queryId) {
    progressBox.hidden = false;
    bar.value = 0;
    await followProgress(queryId, bar, stage);
    const query = await api("GET", queriesUrl(jobId, `/${encodeURIComponent(queryId)}`));
    if (query.status !== "completed") {
      showError(`The query ${query.status}${query.error ? `: ${query.error}` : ""}`);
      announce(`The query ${query.status}`, "error");
      return;
    }
    bar.value = 100;
    stage.textContent = "Done";
    show(query);
    announce("The query was answered");
  }

  async function submit(item) {
    run.disabled = true;
    showError("");
    try {
      const submitted = await api("POST", queriesUrl(jobId), { body: { queries: [item], top_k: TOP_K },
        headers: { "Idempotency-Key": crypto.randomUUID() } });
      await follow(submitted.query_job_id);
      await listEarlier();
    } catch (err) {
      showError(err.message);
    } finally {
      run.disabled = false;
    }
  }

  const form = el("form", { id: "ask-form", novalidate: true,
    onsubmit: (event) => {
      event.preventDefault();
      if (!prompt.value.trim()) {
        showError("Type a prompt first.");
        return;
      }
      submit({ prompt: prompt.value });
    } },
    el("div", { class: "field" }, el("label", { for: "ask-prompt" }, "Prompt"), prompt),
    el("div", { class: "actions" }, run));
  const section = el("section", { class: "card", id: "ask", "aria-labelledby": "ask-heading" },
    el("h2", { id: "ask-heading" }, "Ask the fine-tuned model"),
    el("p", { class: "help" }, "Ask a new prompt and see which training examples drove the answer, by this experiment's influence method."),
    form, error, progressBox, outcome, historyBox);
  listEarlier().catch((err) => showError(err.message));
  return section;
}
