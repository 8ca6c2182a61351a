// Training data: the experiment's training examples ranked by its training summary (net influence
// over the eval set, self-influence, training loss, suspicion), a selection by click or by rule,
// the estimate, and a curation: retrain on the selection against random ones of the same size,
// with a result card (before/after, 95% interval, paired p-value) and the curated set as JSONL or
// Parquet.

import { api, apiBlob, followProgress } from "../api.js";
import { announce, duration, el, usd } from "../ui.js";

const PAGE = 25;
const SORTS = {
  suspect: "most suspect", harmful: "most harmful", helpful: "most helpful",
  self_influence: "highest self-influence", loss: "highest training loss",
  worst_harm: "most harm to one eval example",
};

function url(jobId, suffix) {
  return `/api/jobs/${encodeURIComponent(jobId)}${suffix}`;
}

function fixed(value, digits = 3) {
  return `${value >= 0 ? "+" : ""}${value.toFixed(digits)}`;
}

function downloadButton(curation, extension, label) {
  return el("button", { type: "button", id: `curation-download-${extension}`, onclick: async () => {
    const blob = await apiBlob(url(curation.parent_job_id, `/curations/${encodeURIComponent(curation.curation_job_id)}/training-set.${extension}`));
    const link = el("a", { href: URL.createObjectURL(blob), download: `curated-${curation.curation_job_id.slice(0, 8)}.${extension}` });
    link.click();
    URL.revokeObjectURL(link.href);
  } }, `Download the curated set (${label})`);
}

function resultCard(curation) {
  const result = curation.result;
  const mean = (selection, field) => {
    const runs = result.runs.filter((run) => run.selection === selection);
    return runs.reduce((sum, run) => sum + run[field], 0) / Math.max(runs.length, 1);
  };
  const seeds = new Set(result.runs.map((run) => run.seed)).size;
  const controls = result.control_selected_ids.length;
  const what = result.mode === "drop" ? `Dropped ${result.selected_ids.length}` : `Kept ${result.selected_ids.length}`;
  const rows = [["Exact match", "exact_match", result.exact_match], ["Mean eval loss", "mean_loss", result.loss]];
  return el("section", { class: "card", id: "curation-result", "aria-labelledby": "curation-result-heading" },
    el("h3", { id: "curation-result-heading" }, `${what} training examples (${result.kept} trained on), ${seeds} seed${seeds === 1 ? "" : "s"}, ${controls} random control${controls === 1 ? "" : "s"}`),
    el("table", { class: "data compact", id: "curation-figures" },
      el("thead", {}, el("tr", {}, ["Metric (fine-tuned, eval set)", "Original", "Curated", "Random", "Curated − random [95% interval]", "Paired p"].map((h) => el("th", { scope: "col" }, h)))),
      el("tbody", {}, rows.map(([label, field, diff]) => el("tr", {},
        el("th", { scope: "row" }, label),
        el("td", { class: "num" }, result.original ? result.original[field].toFixed(3) : "—"),
        el("td", { class: "num" }, mean("curated", field).toFixed(3)),
        el("td", { class: "num" }, controls ? mean("control-1", field).toFixed(3) : "—"),
        el("td", { class: "num" }, diff ? `${fixed(diff.mean)} [${fixed(diff.ci_low)}, ${fixed(diff.ci_high)}]` : "—"),
        el("td", { class: "num" }, diff ? diff.p_value.toFixed(3) : "—"))))),
    el("p", { class: "help" }, "Differences are paired per eval example (averaged over seeds and controls); the interval is a bootstrap, the p-value a sign-flip permutation test."),
    el("div", { class: "actions" },
      downloadButton(curation, "jsonl", "JSONL"),
      downloadButton(curation, "parquet", "Parquet"),
      el("a", { class: "button", id: "curation-new-experiment",
        href: `#/new/${encodeURIComponent(curation.parent_job_id)}/${encodeURIComponent(curation.curation_job_id)}` },
      "New experiment from this selection")));
}

export function trainingSection(jobId) {
  const selected = new Set();
  let sort = "suspect";
  let offset = 0;
  let total = 0;
  const sortSelect = el("select", { id: "training-sort" },
    Object.entries(SORTS).map(([value, label]) => el("option", { value }, label)));
  const table = el("table", { class: "data", id: "training-table" });
  const pager = el("p", { class: "help", id: "training-pager" });
  const rule = el("select", { id: "training-rule" },
    el("option", { value: "clicked" }, "the examples I ticked"),
    el("option", { value: "suspect" }, "drop the N most suspect"),
    el("option", { value: "harmful" }, "drop the N most harmful"),
    el("option", { value: "self_influence" }, "drop the N highest self-influence"),
    el("option", { value: "worst_harm" }, "drop the N with the worst harm to one eval example"),
    el("option", { value: "helpful" }, "keep the most helpful fraction"));
  const count = el("input", { id: "training-count", type: "number", min: 1, value: 5 });
  const fraction = el("input", { id: "training-fraction", type: "number", min: 0.01, max: 0.99, step: 0.01, value: 0.25 });
  const controls = el("input", { id: "training-controls", type: "number", min: 0, max: 10, value: 1 });
  const seeds = el("input", { id: "training-seeds", type: "number", min: 1, max: 10, value: 1 });
  const estimateBox = el("div", { id: "training-estimate", class: "help", "aria-live": "polite" });
  const run = el("button", { type: "submit", id: "training-run", disabled: true }, "Run");
  const bar = el("progress", { id: "training-progress", max: 100, value: 0 });
  const stage = el("p", { class: "help" });
  const progressBox = el("div", { id: "training-running", hidden: true }, el("div", { class: "progress-row" }, bar), stage);
  const error = el("p", { class: "error", role: "alert", id: "training-error", hidden: true });
  const outcome = el("div", { id: "training-outcome" });

  function request() {
    const body = { controls: Number(controls.value), seeds: [...Array(Number(seeds.value)).keys()] };
    if (rule.value === "clicked") body.drop_ids = [...selected];
    else if (rule.value === "helpful") body.keep = { by: "helpful", fraction: Number(fraction.value) };
    else body.drop = { by: rule.value, count: Number(count.value) };
    return body;
  }

  function showError(message) {
    error.textContent = message;
    error.hidden = !message;
  }

  async function estimate() {
    run.disabled = true;
    if (rule.value === "clicked" && !selected.size) {
      estimateBox.textContent = "Tick training examples in the table, or choose a rule.";
      return;
    }
    try {
      const answer = await api("POST", url(jobId, "/curations/estimate"), { body: request() });
      const figures = answer.estimates[0];
      estimateBox.textContent = figures
        ? `${answer.mode === "drop" ? "Drops" : "Keeps"} ${answer.selected} examples; ${answer.retrainings} retrainings on ${answer.backend}: about ${duration(figures.estimated_time_s)}, ${usd(figures.estimated_cost_usd)}.`
        : answer.notes.join("; ");
      showError("");
      run.disabled = !figures;
    } catch (err) {
      estimateBox.textContent = "";
      showError(err.message);
    }
  }

  async function load() {
    const page = await api("GET", url(jobId, `/training-examples?sort=${sort}&limit=${PAGE}&offset=${offset}`));
    total = page.total;
    table.replaceChildren(
      el("caption", {}, `Training examples, ${SORTS[sort]} first`),
      el("thead", {}, el("tr", {}, ["Select", "Suspect rank", "Id", "Text", "Net influence", "Worst harm", "Self-influence", "Training loss"].map((h) => el("th", { scope: "col" }, h)))),
      el("tbody", {}, page.examples.map((row) => {
        const box = el("input", { type: "checkbox", "aria-label": `select ${row.id}`, checked: selected.has(row.id),
          onchange: () => {
            if (box.checked) selected.add(row.id); else selected.delete(row.id);
            rule.value = "clicked";
            estimate();
          } });
        return el("tr", { "data-train-id": row.id },
          el("td", {}, box),
          el("td", { class: "num" }, row.suspect_rank),
          el("td", {}, el("code", {}, row.id)),
          el("td", {}, el("q", {}, row.text.replace("\n", " → "))),
          el("td", { class: `num ${row.net_influence < 0 ? "harmful" : "helpful"}` }, row.net_influence.toExponential(2)),
          el("td", { class: "num" }, row.worst_harm === null ? "–" : row.worst_harm.toFixed(2)),
          el("td", { class: "num" }, row.self_influence.toExponential(2)),
          el("td", { class: "num" }, row.train_loss.toFixed(3)));
      })));
    pager.replaceChildren(`${offset + 1}–${Math.min(offset + PAGE, total)} of ${total}`,
      el("button", { type: "button", disabled: offset === 0, onclick: () => { offset = Math.max(0, offset - PAGE); load(); } }, "Previous"),
      el("button", { type: "button", disabled: offset + PAGE >= total, onclick: () => { offset += PAGE; load(); } }, "Next"));
  }

  const form = el("form", { id: "training-form", novalidate: true,
    onsubmit: async (event) => {
      event.preventDefault();
      run.disabled = true;
      showError("");
      try {
        const submitted = await api("POST", url(jobId, "/curations"), { body: request(),
          headers: { "Idempotency-Key": crypto.randomUUID() } });
        progressBox.hidden = false;
        await followProgress(submitted.curation_job_id, bar, stage);
        const curation = await api("GET", url(jobId, `/curations/${encodeURIComponent(submitted.curation_job_id)}`));
        if (curation.status !== "completed") {
          showError(`The curation ${curation.status}${curation.error ? `: ${curation.error}` : ""}`);
          return;
        }
        outcome.replaceChildren(resultCard(curation));
        announce("The curation finished");
      } catch (err) {
        showError(err.message);
      } finally {
        run.disabled = false;
      }
    } },
    el("div", { class: "field" }, el("label", { for: "training-rule" }, "Selection"), rule),
    el("div", { class: "field" }, el("label", { for: "training-count" }, "N (examples to drop)"), count),
    el("div", { class: "field" }, el("label", { for: "training-fraction" }, "Fraction to keep"), fraction),
    el("div", { class: "field" }, el("label", { for: "training-controls" }, "Control selections (random, same size)"), controls),
    el("div", { class: "field" }, el("label", { for: "training-seeds" }, "Seeds"), seeds),
    estimateBox,
    el("div", { class: "actions" }, run));
  for (const input of [rule, count, fraction, controls, seeds]) input.addEventListener("change", estimate);
  sortSelect.addEventListener("change", () => { sort = sortSelect.value; offset = 0; load(); });

  const section = el("section", { class: "card", id: "training-data", "aria-labelledby": "training-heading" },
    el("h2", { id: "training-heading" }, "Training data"),
    // Folded like the checkpoints: the results page stays a few screens tall until it is opened.
    el("details", { id: "training-details" },
      el("summary", {}, "Rank the training set, select examples, retrain and compare"),
      el("p", { class: "help" }, "Each training example's net influence over the eval set (positive = helpful), its worst harm to a single eval example (in that example's standard deviations), its self-influence, its loss under the fine-tuned model, and a suspicion rank combining the four (likely mislabelled first). Select examples and retrain without them, against random selections of the same size."),
      el("div", { class: "field" }, el("label", { for: "training-sort" }, "Sort by"), sortSelect),
      table, pager, form, error, progressBox, outcome));
  load().then(estimate).catch((err) => {
    table.replaceChildren();
    showError(err.message);
  });
  return section;
}
