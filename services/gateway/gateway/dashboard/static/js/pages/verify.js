// Verify: a counterfactual check of the experiment's influence scores. Retrain without the top-k
// training examples for the chosen eval examples (and as many random ones, as controls), then
// chart each eval example's loss change and show its answer before and after. The estimate is
// shown before anything is submitted. The check is a job: progress over SSE, like experiments.

import { api, followProgress } from "../api.js";
import { announce, duration, el, loadPlotly, usd } from "../ui.js";

const ESTIMATE_DELAY_MS = 250;

function field(label, input, help) {
  return el("div", { class: "field" }, el("label", { for: input.id }, label), input,
    help ? el("div", { class: "help" }, help) : null);
}

function numberInput(id, value, min, max) {
  return el("input", { id, type: "number", value, min, max, step: 1, inputmode: "numeric" });
}

function checkUrl(jobId, suffix = "") {
  return `/api/jobs/${encodeURIComponent(jobId)}/counterfactual${suffix}`;
}

function signed(value) {
  return `${value >= 0 ? "+" : ""}${value.toFixed(3)}`;
}

async function drawChart(host, check) {
  const Plotly = await loadPlotly();
  const ids = check.examples.map((x) => x.id);
  const controls = check.control_removed_ids.length;
  const traces = [{
    type: "bar", name: `top ${check.k} ${check.remove} removed`, x: ids,
    y: check.examples.map((x) => x.top_k_loss_change), marker: { color: "#0550ae" },
    hovertemplate: "eval %{x}<br>loss change %{y:+.4f}<extra>top-k removed</extra>",
  }];
  for (let c = 0; c < controls; c += 1) {
    traces.push({
      type: "bar", name: `random control ${c + 1}`, x: ids,
      y: check.examples.map((x) => x.random_loss_changes[c]), marker: { color: "#9aa4af" },
      hovertemplate: `eval %{x}<br>loss change %{y:+.4f}<extra>control ${c + 1}</extra>`,
    });
  }
  Plotly.newPlot(host, traces, {
    barmode: "group",
    margin: { t: 10, r: 10, b: 60, l: 70 },
    height: 320,
    xaxis: { title: { text: "eval example" }, type: "category" },
    yaxis: { title: { text: "loss change (after − before)" }, zeroline: true },
    legend: { orientation: "h", y: -0.25 },
  }, { displaylogo: false, responsive: true });
}

function answersTable(check, describe) {
  return el("table", { class: "data", id: "verify-answers" },
    el("caption", {}, "Each checked eval example before and after the removal"),
    el("thead", {}, el("tr", {},
      ["Eval example", "Answer before", `Answer without the top ${check.k}`, "Loss before → after",
        "Random controls (loss change)", "Beats every control"].map((h) => el("th", { scope: "col" }, h)))),
    el("tbody", {}, check.examples.map((x) => el("tr", { "data-eval-id": x.id },
      el("th", { scope: "row" }, el("code", {}, x.id), el("div", { class: "help" }, describe(x.id))),
      el("td", {}, el("q", { class: "before" }, x.original_output)),
      el("td", {}, el("q", { class: "after" }, x.without_top_k_output)),
      el("td", { class: "num" }, `${x.original_loss.toFixed(3)} → ${x.without_top_k_loss.toFixed(3)} (${signed(x.top_k_loss_change)})`),
      el("td", { class: "num" }, x.random_loss_changes.map(signed).join(", ") || "—"),
      el("td", {}, x.beats_controls === null ? "—" : x.beats_controls ? "✓ yes" : "✗ no")))));
}

function summary(check) {
  const rate = check.beats_controls_rate;
  const judged = check.examples.filter((x) => x.beats_controls !== null).length;
  const direction = check.remove === "helpful" ? "up" : "down";
  const lines = [
    el("p", { id: "verify-summary" }, rate === null
      ? `Retrained without ${check.removed_ids.length} training examples (no random controls to compare with).`
      : `Removing the top ${check.k} ${check.remove} examples moved the loss ${direction} further than every random control for ${Math.round(rate * judged)} of ${judged} eval examples (${(rate * 100).toFixed(0)}%).`),
    el("p", { class: "help" }, "Removed: ", check.removed_ids.map((id, i) => [i ? ", " : "", el("code", {}, id)])),
  ];
  if (check.lds) {
    lines.push(el("p", { id: "verify-lds" },
      `Linear datamodeling score (${check.lds.subsets} random ${(check.lds.fraction * 100).toFixed(0)}% subsets): ${check.lds.mean.toFixed(3)}`));
  }
  return lines;
}

// The eval ids last picked on the results page: a click on anything marked data-eval-id (a top-k
// card, an eval row) outside the Verify card selects that eval example.
export function trackSelection(host) {
  let picked = [];
  host.addEventListener("click", (event) => {
    const target = event.target.closest("[data-eval-id]");
    if (target && !target.closest("#verify")) picked = [target.dataset.evalId];
  });
  return () => picked;
}

// The Verify card for a completed experiment. `describe(evalId)` gives an eval example's text;
// `selection()` the eval ids selected on the results page (the default choice).
export function verifySection(jobId, result, { describe = () => "", selection = () => [] } = {}) {
  const influence = result.influence;
  const hasMatrix = Array.isArray(influence.scores) && influence.scores.length > 0;
  const maxK = hasMatrix ? influence.train_ids.length - 1
    // A loop, not a spread: a large result's top-k lists would overflow the call stack.
    : Object.values(influence.top_k).reduce((most, t) => Math.max(most, t.helpful.length, t.harmful.length), 1);
  const chosen = new Set(selection().length ? selection() : influence.eval_ids.slice(0, 1));
  const evalSelect = el("select", { id: "verify-eval-ids", multiple: true, size: Math.min(6, influence.eval_ids.length) },
    influence.eval_ids.map((id) => el("option", { value: id, selected: chosen.has(id) }, `${id} ${describe(id)}`)));
  const k = numberInput("verify-k", 1, 1, Math.max(1, maxK));
  const controls = numberInput("verify-controls", 2, 0, 16);
  const lds = numberInput("verify-lds", 0, 0, 64);
  const removeHelpful = el("input", { type: "radio", name: "verify-remove", id: "verify-remove-helpful", value: "helpful", checked: true });
  const removeHarmful = el("input", { type: "radio", name: "verify-remove", id: "verify-remove-harmful", value: "harmful" });
  const estimateBox = el("div", { id: "verify-estimate", class: "help", "aria-live": "polite" }, "Estimating…");
  const run = el("button", { type: "submit", id: "verify-run", disabled: true }, "Run the check");
  const bar = el("progress", { id: "verify-progress", max: 100, value: 0 });
  const stage = el("p", { id: "verify-stage", class: "help" });
  const progressBox = el("div", { id: "verify-running", hidden: true },
    el("label", { for: "verify-progress" }, "Check progress"), el("div", { class: "progress-row" }, bar), stage);
  const error = el("p", { id: "verify-error", class: "error", role: "alert", hidden: true });
  const chart = el("div", { id: "verify-chart", class: "chart", role: "img",
    "aria-label": "Loss change of each checked eval example with the top-k removed and with each random control" });
  const outcome = el("div", { id: "verify-result", hidden: true });
  let estimateTimer = null;
  let estimateSeq = 0;

  function body() {
    const evalIds = [...evalSelect.selectedOptions].map((o) => o.value);
    const request = {
      eval_ids: evalIds.length ? evalIds : null,
      k: Number(k.value),
      remove: removeHarmful.checked ? "harmful" : "helpful",
      controls: Number(controls.value),
    };
    if (Number(lds.value) > 0) request.lds_subsets = Number(lds.value);
    return request;
  }

  function showError(message) {
    error.textContent = message;
    error.hidden = !message;
  }

  // Run is enabled once an estimate for the form has been shown; a re-estimate after an edit
  // leaves it as it is (a click on Run that blurs the edited field must not be lost).
  async function estimate() {
    const seq = ++estimateSeq;
    estimateBox.textContent = "Estimating…";
    try {
      const answer = await api("POST", checkUrl(jobId, "/estimate"), { body: body() });
      if (seq !== estimateSeq) return;
      const figures = answer.estimates[0];
      if (!figures) {
        estimateBox.textContent = answer.notes.join("; ") || "No estimate is available for this backend.";
        run.disabled = true;
        return;
      }
      estimateBox.replaceChildren(
        el("strong", {}, `${answer.retrainings} retrainings`),
        ` on ${answer.backend} (${figures.provider}, ${figures.gpu}): about ${duration(figures.estimated_time_s)}, ${usd(figures.estimated_cost_usd)}.`);
      showError("");
      run.disabled = false;
    } catch (err) {
      if (seq !== estimateSeq) return;
      estimateBox.textContent = "";
      run.disabled = true;
      showError(err.message);
    }
  }

  function scheduleEstimate() {
    clearTimeout(estimateTimer);
    estimateTimer = setTimeout(estimate, ESTIMATE_DELAY_MS);
  }

  async function follow(checkId) {
    progressBox.hidden = false;
    await followProgress(checkId, bar, stage);
    const check = await api("GET", checkUrl(jobId, `/${encodeURIComponent(checkId)}`));
    if (check.status !== "completed") {
      showError(`The check ${check.status}${check.error ? `: ${check.error}` : ""}`);
      announce(`The counterfactual check ${check.status}`, "error");
      return;
    }
    bar.value = 100;
    stage.textContent = "Done";
    outcome.replaceChildren(...summary(check.result), chart, answersTable(check.result, describe));
    outcome.hidden = false;
    await drawChart(chart, check.result);
    announce("The counterfactual check finished");
  }

  const form = el("form", { id: "verify-form", novalidate: true,
    onsubmit: async (event) => {
      event.preventDefault();
      run.disabled = true;
      showError("");
      outcome.hidden = true;
      try {
        const submitted = await api("POST", checkUrl(jobId), { body: body(),
          headers: { "Idempotency-Key": crypto.randomUUID() } });
        await follow(submitted.counterfactual_job_id);
      } catch (err) {
        showError(err.message);
      } finally {
        run.disabled = false;
      }
    } },
    field("Eval examples to check", evalSelect, "The removal set is the union of each one's top-k; choose one for a clean per-example answer."),
    field("k (training examples removed per eval example)", k),
    el("fieldset", {}, el("legend", {}, "Remove the"),
      el("label", {}, removeHelpful, " most helpful"), el("label", {}, removeHarmful, " most harmful")),
    field("Random controls", controls, "Retrainings without as many random examples, to compare with."),
    hasMatrix ? field("LDS subsets (optional)", lds, "Extra retrainings on random half-subsets for the linear datamodeling score.") : null,
    estimateBox,
    el("div", { class: "actions" }, run));
  for (const input of [evalSelect, k, controls, lds, removeHelpful, removeHarmful]) {
    input.addEventListener("input", scheduleEstimate);
    input.addEventListener("change", scheduleEstimate);
  }

  const panel = el("div", { id: "verify-panel", hidden: true }, form, error, progressBox, outcome);
  const open = el("button", { type: "button", id: "verify-open", "aria-expanded": "false", "aria-controls": "verify-panel",
    onclick: () => {
      panel.hidden = !panel.hidden;
      open.setAttribute("aria-expanded", String(!panel.hidden));
      if (!panel.hidden) {
        const picked = selection();
        if (picked.length) for (const option of evalSelect.options) option.selected = picked.includes(option.value);
        estimate();
      }
    } }, "Verify…");
  return el("section", { class: "card", id: "verify", "aria-labelledby": "verify-heading" },
    el("h2", { id: "verify-heading" }, "Verify the scores"),
    el("p", { class: "help" }, "Influence scores are estimates. Retrain without the top-ranked training examples and see whether the eval answers change more than when removing random ones."),
    el("div", { class: "actions" }, open),
    panel);
}
