// Results: the three evaluations side by side, the influence heatmap (eval x train), the top
// helpful and harmful training examples per eval example, and downloads (JSON, CSV of the top
// examples, the job's files: scores.npy, the LoRA adapter, ...).
//
// Built for 1,000 eval x 10,000 training examples: the result JSON carries no full score matrix
// at that size, only `influence.heatmap` (the rows and columns with the largest magnitudes) and
// `top_k`; the matrix itself is the scores.npy artifact. Long lists render a page at a time, and
// no array is ever spread into a call (`Math.max(...scores)` overflows the stack at ~100k).

import { api, apiBlob } from "../api.js";
import { specTexts } from "../spectexts.js";
import { announce, bytes, download, el, loadPlotly } from "../ui.js";
import { askSection } from "./ask.js";
import { mergeControls } from "./merge.js";
import { trackSelection, verifySection } from "./verify.js";
import { trainingSection } from "./training.js";

const RUNS = [["base", "Base model"], ["few_shot", "Few-shot"], ["finetuned", "Fine-tuned"]];
// The heatmap's largest shape, the same bound the pipeline uses for `influence.heatmap`.
export const HEATMAP_MAX_EVAL = 50;
export const HEATMAP_MAX_TRAIN = 200;
const PAGE_ROWS = 25;

function escapeHtml(text) {
  return String(text).replace(/[&<>"]/g, (ch) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[ch]);
}

function describe(texts, kind, id) {
  const entry = texts && texts[kind][id];
  return entry ? `${entry.prompt} → ${entry.answer}` : "(text not available in this browser)";
}

function count(n) {
  return n.toLocaleString("en-US");
}

// A spreadsheet must not run a cell as a formula (OWASP CSV injection).
function csvCell(value) {
  let text = value === null || value === undefined ? "" : String(value);
  if (typeof value === "string" && /^[=+\-@\t\r]/.test(text)) text = `'${text}`;
  return /[",\n\r]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
}

function csv(header, rows) {
  const lines = [header.join(",")];
  for (const row of rows) lines.push(row.map(csvCell).join(","));
  return `${lines.join("\r\n")}\r\n`;
}

// Every score, one row per (eval, train) pair: only offered when the result carries the matrix.
export function influenceCsv(result, texts) {
  const { eval_ids: evalIds, train_ids: trainIds, scores } = result.influence;
  const rows = [];
  evalIds.forEach((evalId, i) => {
    const e = texts?.eval[evalId];
    trainIds.forEach((trainId, j) => {
      const t = texts?.train[trainId];
      rows.push([evalId, e?.prompt, e?.answer, trainId, t?.prompt, t?.answer, scores[i][j]]);
    });
  });
  return csv(["eval_id", "eval_prompt", "eval_expected", "train_id", "train_prompt", "train_completion", "score"], rows);
}

// The top helpful and harmful training examples of every eval example, ranked.
export function topKCsv(result, texts) {
  const { eval_ids: evalIds, top_k: topK } = result.influence;
  const rows = [];
  for (const evalId of evalIds) {
    const e = texts?.eval[evalId];
    const top = topK[evalId] || { helpful: [], harmful: [] };
    for (const kind of ["helpful", "harmful"]) {
      top[kind].forEach((item, rank) => {
        const t = texts?.train[item.id];
        rows.push([evalId, e?.prompt, e?.answer, kind, rank + 1, item.id, t?.prompt, t?.answer, item.score]);
      });
    }
  }
  return csv(["eval_id", "eval_prompt", "eval_expected", "kind", "rank", "train_id", "train_prompt",
    "train_completion", "score"], rows);
}

// Indices of the `limit` largest values of `magnitude` (ties: the lower index), in index order.
function largest(magnitude, limit) {
  if (magnitude.length <= limit) return magnitude.map((_, i) => i);
  const order = magnitude.map((_, i) => i);
  order.sort((a, b) => magnitude[b] - magnitude[a] || a - b);
  return order.slice(0, limit).sort((a, b) => a - b);
}

// What the heatmap draws: {eval_ids, train_ids, scores, subset}. The full matrix when it is in the
// result and small; the pipeline's `influence.heatmap` otherwise; and for a result with a large
// inline matrix (before the heatmap existed) the same selection made here.
export function heatmapView(influence) {
  const { scores } = influence;
  const fits = scores && influence.eval_ids.length <= HEATMAP_MAX_EVAL && influence.train_ids.length <= HEATMAP_MAX_TRAIN;
  if (fits) return { eval_ids: influence.eval_ids, train_ids: influence.train_ids, scores, subset: false };
  if (influence.heatmap) return { ...influence.heatmap, subset: true };
  if (!scores) return null;
  const rowMax = scores.map((row) => row.reduce((m, v) => Math.max(m, Math.abs(v)), 0));
  const colMax = new Array(influence.train_ids.length).fill(0);
  for (const row of scores) row.forEach((v, j) => { colMax[j] = Math.max(colMax[j], Math.abs(v)); });
  const rows = largest(rowMax, HEATMAP_MAX_EVAL);
  const cols = largest(colMax, HEATMAP_MAX_TRAIN);
  return {
    eval_ids: rows.map((i) => influence.eval_ids[i]),
    train_ids: cols.map((j) => influence.train_ids[j]),
    scores: rows.map((i) => cols.map((j) => scores[i][j])),
    subset: true,
  };
}

function maxAbs(matrix) {
  let largestSoFar = 1e-12;
  for (const row of matrix) for (const v of row) if (Math.abs(v) > largestSoFar) largestSoFar = Math.abs(v);
  return largestSoFar;
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

// `ids` rendered `PAGE_ROWS` at a time into `body` by `render(id)`, with a "Show more" button.
function paged(ids, body, render, what) {
  let shown = 0;
  const more = el("button", { type: "button", class: "show-more" });
  function showMore() {
    const next = ids.slice(shown, shown + PAGE_ROWS);
    body.append(...next.map(render));
    shown += next.length;
    more.hidden = shown >= ids.length;
    more.textContent = `Show ${Math.min(PAGE_ROWS, ids.length - shown)} more ${what} (${count(shown)} of ${count(ids.length)} shown)`;
  }
  more.addEventListener("click", showMore);
  showMore();
  return more;
}

function examplesTable(evalResults, evalIds, texts) {
  const byRun = Object.fromEntries(RUNS.map(([run]) => [run, new Map(evalResults[run].examples.map((x) => [x.id, x]))]));
  const row = (id) => el("tr", {},
    el("th", { scope: "row" }, el("code", {}, id), el("div", { class: "help" }, describe(texts, "eval", id))),
    RUNS.map(([run]) => {
      const outcome = byRun[run].get(id);
      if (!outcome) return el("td", {}, "—");
      return el("td", { class: outcome.exact_match ? "match" : "miss" },
        el("span", { class: "visually-hidden" }, outcome.exact_match ? "exact match: " : "no match: "),
        el("span", { "aria-hidden": "true" }, outcome.exact_match ? "✓ " : "✗ "),
        el("q", {}, outcome.output),
        el("div", { class: "help" }, `loss ${outcome.loss.toFixed(3)}`));
    }));
  const body = el("tbody", {});
  const more = paged(evalIds, body, row, "eval examples");
  more.id = "outputs-more";
  return [el("table", { class: "data", id: "outputs-table" },
    el("caption", {}, "Each eval example's answer from each model"),
    el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "Eval example (prompt → expected)"),
      RUNS.map(([, label]) => el("th", { scope: "col" }, label)))),
    body), more];
}

async function drawHeatmap(host, view, texts) {
  const Plotly = await loadPlotly();
  const hover = view.eval_ids.map((evalId) => {
    const evalText = escapeHtml(describe(texts, "eval", evalId));
    return view.train_ids.map((trainId) => [evalText, escapeHtml(describe(texts, "train", trainId))]);
  });
  const limit = maxAbs(view.scores);
  Plotly.newPlot(host, [{
    type: "heatmap",
    z: view.scores,
    x: view.train_ids,
    y: view.eval_ids,
    customdata: hover,
    colorscale: "RdBu",
    reversescale: true, // plotly's RdBu puts blue low; helpful (positive) should be blue
    zmin: -limit,
    zmax: limit,
    colorbar: { title: { text: "influence" } },
    hovertemplate: "<b>eval %{y}</b>: %{customdata[0]}<br><b>train %{x}</b>: %{customdata[1]}<br>score: %{z:.4g}<extra></extra>",
  }], {
    margin: { t: 10, r: 10, b: 120, l: 120 },
    height: Math.min(900, Math.max(300, 40 * view.eval_ids.length + 160)),
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
  const card = (evalId) => {
    const top = influence.top_k[evalId] || { helpful: [], harmful: [] };
    return el("article", { class: "top-card", "data-eval-id": evalId },
      el("h4", {}, el("code", {}, evalId), " ", describe(texts, "eval", evalId)),
      el("div", { class: "columns" },
        el("div", {}, el("h5", {}, "Most helpful"), scoredList("helpful", top.helpful, texts)),
        el("div", {}, el("h5", {}, "Most harmful"), scoredList("harmful", top.harmful, texts))));
  };
  const list = el("div", { id: "top-examples" });
  const host = el("div", {});
  const filter = el("input", { type: "search", id: "top-filter", placeholder: "id or text" });
  function show() {
    const needle = filter.value.trim().toLowerCase();
    const ids = needle
      ? influence.eval_ids.filter((id) => id.toLowerCase().includes(needle)
        || describe(texts, "eval", id).toLowerCase().includes(needle))
      : influence.eval_ids;
    list.replaceChildren();
    const more = paged(ids, list, card, "eval examples");
    more.id = "top-more";
    host.replaceChildren(ids.length ? list : el("p", { class: "help", id: "top-none" }, "No eval example matches."), more);
  }
  let pending = 0;
  filter.addEventListener("input", () => {
    clearTimeout(pending);
    pending = setTimeout(show, 200);
  });
  show();
  return [
    influence.eval_ids.length > PAGE_ROWS
      ? el("div", { class: "field" }, el("label", { for: "top-filter" }, "Find an eval example"), filter)
      : null,
    host,
  ];
}

function artifactPath(jobId, name) {
  return `/api/jobs/${encodeURIComponent(jobId)}/artifacts/${name.split("/").map(encodeURIComponent).join("/")}`;
}

const ARTIFACT_LABELS = {
  "scores.npy": "Influence scores, the full matrix (NumPy float32, rows = eval, columns = training, in the order of the result's ids)",
  "adapter/adapter_model.safetensors": "LoRA adapter weights (load with PEFT onto the base model)",
  "adapter/adapter_config.json": "LoRA adapter configuration",
};

async function downloadArtifact(button, jobId, artifact) {
  button.disabled = true;
  announce(`Downloading ${artifact.name} (${bytes(artifact.bytes)})…`);
  try {
    const blob = await apiBlob(artifactPath(jobId, artifact.name));
    download(artifact.name.split("/").pop(), blob, artifact.media_type);
    announce(`Downloaded ${artifact.name}`);
  } catch (error) {
    announce(`Could not download ${artifact.name}: ${error.message}`, "error");
  } finally {
    button.disabled = false;
  }
}

// The job's files from the gateway (what the store holds now), the result's list if that fails.
async function artifactsTable(jobId, result) {
  let artifacts = result.artifacts || [];
  let note = null;
  try {
    artifacts = (await api("GET", `/api/jobs/${encodeURIComponent(jobId)}/artifacts`)).artifacts;
  } catch (error) {
    if (error.status === 404) artifacts = [];
    else note = el("p", { class: "help" }, `The list of files could not be read: ${error.message}`);
  }
  if (!artifacts.length) return [note, el("p", { class: "help", id: "no-artifacts" }, "This experiment kept no files.")];
  const rank = (name) => (name === "scores.npy" ? 0 : name.startsWith("adapter/") ? 1 : 2);
  const sorted = [...artifacts].sort((a, b) => rank(a.name) - rank(b.name) || a.name.localeCompare(b.name));
  const grouped = sorted.filter((artifact) => artifact.name.startsWith(GROUPED_PREFIX));
  const row = (artifact) => {
    const button = el("button", { type: "button", "data-artifact": artifact.name, "aria-label": `Download ${artifact.name}` }, "Download");
    button.addEventListener("click", () => downloadArtifact(button, jobId, artifact));
    return el("tr", {},
      el("td", {}, el("code", {}, artifact.name)),
      el("td", {}, ARTIFACT_LABELS[artifact.name] || ""),
      el("td", { class: "num" }, bytes(artifact.bytes)),
      el("td", {}, el("code", { title: artifact.sha256 }, (artifact.sha256 || "").slice(0, 12))),
      el("td", {}, button));
  };
  return [note, el("table", { class: "data", id: "artifacts-table" },
    el("caption", {}, "Files"),
    el("thead", {}, el("tr", {}, ["File", "What", "Size", "SHA-256", ""].map((h) => el("th", { scope: "col" }, h)))),
    el("tbody", {},
      sorted.filter((artifact) => !artifact.name.startsWith(GROUPED_PREFIX)).map(row),
      grouped.length ? groupRow(jobId, grouped, row) : null))];
}

// Checkpoints and optimizer statistics (one file per epoch and kind, hundreds for a long run):
// one row that opens to list them, with one archive download of them all.
const GROUPED_PREFIX = "checkpoints/";

function groupRow(jobId, grouped, row) {
  const total = grouped.reduce((sum, artifact) => sum + artifact.bytes, 0);
  const moments = grouped.filter((artifact) => artifact.name.includes("second-moment")).length;
  const archive = el("button", { type: "button", id: "download-checkpoints" }, "Download all (zip)");
  archive.addEventListener("click", async () => {
    archive.disabled = true;
    announce(`Downloading ${grouped.length} files (${bytes(total)}) as one archive…`);
    try {
      const path = `/api/jobs/${encodeURIComponent(jobId)}/artifacts.zip?prefix=${encodeURIComponent(GROUPED_PREFIX)}`;
      download(`checkpoints-${jobId.slice(0, 8)}.zip`, await apiBlob(path), "application/zip");
      announce("Downloaded the checkpoints archive");
    } catch (error) {
      announce(`Could not download the checkpoints: ${error.message}`, "error");
    } finally {
      archive.disabled = false;
    }
  });
  const inner = el("table", { class: "data", id: "checkpoint-files" }, el("tbody", {}));
  const details = el("details", { class: "artifact-group", id: "checkpoints-group" },
    el("summary", {}, `Show the ${grouped.length} files`), inner);
  // The rows are built the first time the group opens: most visits never open it.
  details.addEventListener("toggle", () => {
    if (details.open && !inner.tBodies[0].rows.length) inner.tBodies[0].append(...grouped.map(row));
  });
  return el("tr", { id: "checkpoints-row" },
    el("td", {}, el("code", {}, GROUPED_PREFIX), details),
    el("td", {}, `Training checkpoints per epoch (TracIn's states)${moments ? ` and the optimizer's second moments (${moments} files)` : ""}`),
    el("td", { class: "num" }, bytes(total)),
    el("td", {}, `${grouped.length} files`),
    el("td", {}, archive));
}

export async function renderResults(host, jobId, result) {
  const texts = await specTexts(jobId);
  const influence = result.influence;
  const view = heatmapView(influence);
  const nEval = influence.eval_ids.length;
  const nTrain = influence.train_ids.length;
  const heatmap = view ? el("div", { id: "heatmap", class: "chart", role: "img",
    "aria-label": `Influence of ${view.subset ? "the most influential " : "each of "}${count(view.train_ids.length)} training examples on ${view.subset ? "the most influenced " : "each of "}${count(view.eval_ids.length)} eval examples` })
    : el("p", { class: "help", id: "heatmap" }, "This result has no influence scores to draw.");
  const short = jobId.slice(0, 8);
  const [mergeOpen, mergePanel] = mergeControls(jobId);
  const downloads = el("div", { class: "actions" },
    el("button", { type: "button", id: "download-json",
      onclick: () => download(`results-${short}.json`, JSON.stringify({ job_id: jobId, result, examples: texts }, null, 2), "application/json") },
    "Download JSON"),
    el("button", { type: "button", id: "download-topk-csv",
      onclick: () => download(`top-examples-${short}.csv`, topKCsv(result, texts), "text/csv") },
    "Download CSV (top examples)"),
    influence.scores ? el("button", { type: "button", id: "download-csv",
      onclick: () => download(`influence-${short}.csv`, influenceCsv(result, texts), "text/csv") },
    "Download CSV (influence scores)") : null,
    mergeOpen);
  host.replaceChildren(
    el("section", { class: "card", "aria-labelledby": "eval-heading" },
      el("h2", { id: "eval-heading" }, "Evaluations"),
      metricsTable(result.eval_results),
      examplesTable(result.eval_results, influence.eval_ids, texts)),
    el("section", { class: "card", "aria-labelledby": "influence-heading" },
      el("h2", { id: "influence-heading" }, `Influence (${influence.method})`),
      el("p", { class: "help" }, "Blue: the training example helped this eval answer (up-weighting it lowers the eval loss); red: it hurt. Hover a cell for both texts and the score."),
      view?.subset ? el("p", { class: "help", id: "heatmap-subset" },
        `Showing the ${count(view.eval_ids.length)} eval × ${count(view.train_ids.length)} training examples with the largest influence magnitudes, of ${count(nEval)} × ${count(nTrain)}. Download scores.npy for the whole matrix.`) : null,
      texts ? null : el("p", { class: "help" }, "The experiment's texts could not be read, so examples show by id only."),
      heatmap,
      el("h3", {}, "Top training examples per eval example"),
      topExamples(influence, texts)),
    el("section", { class: "card", "aria-labelledby": "download-heading" },
      el("h2", { id: "download-heading" }, "Download"),
      downloads,
      mergePanel,
      await artifactsTable(jobId, result)));
  host.append(verifySection(jobId, result,
    { describe: (id) => describe(texts, "eval", id), selection: trackSelection(host) }));
  host.append(askSection(jobId));
  host.append(trainingSection(jobId));
  if (view) await drawHeatmap(heatmap, view, texts);
}
