// Results: the three evaluations side by side, the influence heatmap (eval x train), the top
// helpful and harmful training examples per eval example, and JSON / CSV downloads.

import { specTexts } from "../spectexts.js";
import { download, el, loadPlotly } from "../ui.js";
import { trackSelection, verifySection } from "./verify.js";

const RUNS = [["base", "Base model"], ["few_shot", "Few-shot"], ["finetuned", "Fine-tuned"]];

function escapeHtml(text) {
  return String(text).replace(/[&<>"]/g, (ch) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[ch]);
}

function describe(texts, kind, id) {
  const entry = texts && texts[kind][id];
  return entry ? `${entry.prompt} → ${entry.answer}` : "(text not available in this browser)";
}

// A spreadsheet must not run a cell as a formula (OWASP CSV injection).
function csvCell(value) {
  let text = value === null || value === undefined ? "" : String(value);
  if (typeof value === "string" && /^[=+\-@\t\r]/.test(text)) text = `'${text}`;
  return /[",\n\r]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
}

export function influenceCsv(result, texts) {
  const header = ["eval_id", "eval_prompt", "eval_expected", "train_id", "train_prompt", "train_completion", "score"];
  const lines = [header.join(",")];
  const { eval_ids: evalIds, train_ids: trainIds, scores } = result.influence;
  evalIds.forEach((evalId, i) => {
    const e = texts?.eval[evalId];
    trainIds.forEach((trainId, j) => {
      const t = texts?.train[trainId];
      lines.push([evalId, e?.prompt, e?.answer, trainId, t?.prompt, t?.answer, scores[i][j]].map(csvCell).join(","));
    });
  });
  return `${lines.join("\r\n")}\r\n`;
}

function metricsTable(evalResults) {
  const row = (label, pick) => el("tr", {}, el("th", { scope: "row" }, label),
    RUNS.map(([run]) => el("td", { class: "num" }, pick(evalResults[run].metrics))));
  return el("table", { class: "data compact", id: "metrics-table" },
    el("caption", {}, "Metrics on the eval examples"),
    el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "Metric"), RUNS.map(([, label]) => el("th", { scope: "col" }, label)))),
    el("tbody", {},
      row("Exact match", (m) => `${(m.exact_match_rate * 100).toFixed(1)}%`),
      row("Mean loss", (m) => m.mean_loss.toFixed(4)),
      row("Examples", (m) => m.n)));
}

function examplesTable(evalResults, evalIds, texts) {
  const byRun = Object.fromEntries(RUNS.map(([run]) => [run, Object.fromEntries(evalResults[run].examples.map((x) => [x.id, x]))]));
  const rows = evalIds.map((id) => el("tr", {},
    el("th", { scope: "row" }, el("code", {}, id), el("div", { class: "help" }, describe(texts, "eval", id))),
    RUNS.map(([run]) => {
      const outcome = byRun[run][id];
      if (!outcome) return el("td", {}, "—");
      return el("td", { class: outcome.exact_match ? "match" : "miss" },
        el("span", { class: "visually-hidden" }, outcome.exact_match ? "exact match: " : "no match: "),
        el("span", { "aria-hidden": "true" }, outcome.exact_match ? "✓ " : "✗ "),
        el("q", {}, outcome.output),
        el("div", { class: "help" }, `loss ${outcome.loss.toFixed(3)}`));
    })));
  return el("table", { class: "data", id: "outputs-table" },
    el("caption", {}, "Each eval example's answer from each model"),
    el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "Eval example (prompt → expected)"),
      RUNS.map(([, label]) => el("th", { scope: "col" }, label)))),
    el("tbody", {}, rows));
}

async function drawHeatmap(host, influence, texts) {
  const Plotly = await loadPlotly();
  const hover = influence.eval_ids.map((evalId) => influence.train_ids.map((trainId) =>
    [escapeHtml(describe(texts, "eval", evalId)), escapeHtml(describe(texts, "train", trainId))]));
  const maxAbs = Math.max(1e-12, ...influence.scores.flat().map(Math.abs));
  Plotly.newPlot(host, [{
    type: "heatmap",
    z: influence.scores,
    x: influence.train_ids,
    y: influence.eval_ids,
    customdata: hover,
    colorscale: "RdBu",
    reversescale: true, // plotly's RdBu puts blue low; helpful (positive) should be blue
    zmin: -maxAbs,
    zmax: maxAbs,
    colorbar: { title: { text: "influence" } },
    hovertemplate: "<b>eval %{y}</b>: %{customdata[0]}<br><b>train %{x}</b>: %{customdata[1]}<br>score: %{z:.4g}<extra></extra>",
  }], {
    margin: { t: 10, r: 10, b: 120, l: 120 },
    height: Math.max(300, 40 * influence.eval_ids.length + 160),
    xaxis: { title: { text: "training example" }, tickangle: -45, type: "category" },
    yaxis: { title: { text: "eval example" }, autorange: "reversed", type: "category" },
  }, { displaylogo: false, responsive: true });
}

function scoredList(kind, items, texts) {
  if (!items.length) return el("p", { class: "help" }, `No ${kind} training examples.`);
  return el("ol", { class: `top-list ${kind}` }, items.map((item) => el("li", {},
    el("code", {}, item.id), ` (${item.score >= 0 ? "+" : ""}${item.score.toPrecision(3)}) `,
    el("span", {}, describe(texts, "train", item.id)))));
}

function topExamples(influence, texts) {
  return el("div", { id: "top-examples" }, influence.eval_ids.map((evalId) => {
    const top = influence.top_k[evalId] || { helpful: [], harmful: [] };
    return el("article", { class: "top-card", "data-eval-id": evalId },
      el("h4", {}, el("code", {}, evalId), " ", describe(texts, "eval", evalId)),
      el("div", { class: "columns" },
        el("div", {}, el("h5", {}, "Most helpful"), scoredList("helpful", top.helpful, texts)),
        el("div", {}, el("h5", {}, "Most harmful"), scoredList("harmful", top.harmful, texts))));
  }));
}

export async function renderResults(host, jobId, result) {
  const texts = await specTexts(jobId);
  const influence = result.influence;
  const heatmap = el("div", { id: "heatmap", class: "chart", role: "img",
    "aria-label": `Influence of each of ${influence.train_ids.length} training examples on each of ${influence.eval_ids.length} eval examples` });
  const short = jobId.slice(0, 8);
  host.replaceChildren(
    el("section", { class: "card", "aria-labelledby": "eval-heading" },
      el("h2", { id: "eval-heading" }, "Evaluations"),
      metricsTable(result.eval_results),
      examplesTable(result.eval_results, influence.eval_ids, texts)),
    el("section", { class: "card", "aria-labelledby": "influence-heading" },
      el("h2", { id: "influence-heading" }, `Influence (${influence.method})`),
      el("p", { class: "help" }, "Blue: the training example helped this eval answer (up-weighting it lowers the eval loss); red: it hurt. Hover a cell for both texts and the score."),
      texts ? null : el("p", { class: "help" }, "The experiment's texts could not be read, so examples show by id only."),
      heatmap,
      el("h3", {}, "Top training examples per eval example"),
      topExamples(influence, texts)),
    el("section", { class: "card", "aria-labelledby": "download-heading" },
      el("h2", { id: "download-heading" }, "Download"),
      el("div", { class: "actions" },
        el("button", { type: "button", id: "download-json",
          onclick: () => download(`results-${short}.json`, JSON.stringify({ job_id: jobId, result, examples: texts }, null, 2), "application/json") },
        "Download JSON"),
        el("button", { type: "button", id: "download-csv",
          onclick: () => download(`influence-${short}.csv`, influenceCsv(result, texts), "text/csv") },
        "Download CSV (influence scores)"))));
  host.append(verifySection(jobId, result,
    { describe: (id) => describe(texts, "eval", id), selection: trackSelection(host) }));
  // Result contract v2: the heatmap submatrix (largest magnitudes); the whole matrix is inline
  // only for small results (older results have no heatmap).
  await drawHeatmap(heatmap, influence.heatmap || influence, texts);
}
