// Compare 2-4 experiments (GET /api/compare): what differs in their settings, the loss curves
// overlaid, the metrics side by side, each eval example's answers per run, and for runs on the
// same data how far their influence agrees.

import { api } from "../api.js";
import { el, plotLossCurves } from "../ui.js";

const EVALUATIONS = [["base", "Base"], ["few_shot", "Few-shot"], ["finetuned", "Fine-tuned"]];

function figure(value) {
  if (value === null || value === undefined) return "—";
  if (typeof value === "number") return Number.isInteger(value) ? String(value) : String(Number(value.toPrecision(4)));
  if (typeof value === "object") return JSON.stringify(value);
  return String(value);
}

function runHeaders(names) {
  return names.map((name) => el("th", { scope: "col" }, name));
}

function configTable(diff, names) {
  const fields = Object.keys(diff);
  if (!fields.length) return el("p", { class: "help", id: "config-same" }, "The experiments' settings and data are the same.");
  return el("table", { class: "data compact", id: "config-diff" },
    el("caption", {}, "Settings that differ"),
    el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "Setting"), runHeaders(names))),
    el("tbody", {}, fields.map((field) => el("tr", {},
      el("th", { scope: "row" }, el("code", {}, field)),
      diff[field].map((value) => el("td", { class: "num" }, figure(value)))))));
}

function metricsTable(metrics, names) {
  const rows = [];
  for (const [run, label] of EVALUATIONS) {
    const perRun = metrics[run];
    rows.push(el("tr", {}, el("th", { scope: "row" }, `${label}: exact match`),
      perRun.map((m) => el("td", { class: "num" }, m ? `${(m.exact_match_rate * 100).toFixed(1)}%` : "—"))));
    rows.push(el("tr", {}, el("th", { scope: "row" }, `${label}: mean loss`),
      perRun.map((m) => el("td", { class: "num" }, m ? m.mean_loss.toFixed(4) : "—"))));
  }
  return el("table", { class: "data compact", id: "compare-metrics" },
    el("caption", {}, "Metrics on the eval examples"),
    el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "Metric"), runHeaders(names))),
    el("tbody", {}, rows));
}

function answersTable(examples, names) {
  return el("table", { class: "data", id: "compare-answers" },
    el("caption", {}, "Each eval example's fine-tuned answer per experiment"),
    el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "Eval example (prompt → expected)"), runHeaders(names))),
    el("tbody", {}, examples.map((example) => el("tr", {},
      el("th", { scope: "row" }, el("code", {}, example.id),
        el("div", { class: "help" }, `${example.prompt} → ${example.expected}`)),
      example.answers.map((answers) => {
        const tuned = answers?.finetuned;
        if (!tuned) return el("td", {}, "—");
        return el("td", { class: tuned.exact_match ? "match" : "miss" },
          el("span", { class: "visually-hidden" }, tuned.exact_match ? "exact match: " : "no match: "),
          el("q", {}, tuned.output),
          el("div", { class: "help" }, `loss ${tuned.loss.toFixed(3)}`));
      })))));
}

function agreementSection(agreement, ids, names) {
  if (!agreement.available) {
    return el("p", { class: "help", id: "agreement" }, `Influence agreement is not available: ${agreement.reason}.`);
  }
  const name = (id) => names[ids.indexOf(id)];
  return el("table", { class: "data compact", id: "agreement" },
    el("caption", {}, "How far the runs' influence agrees"),
    el("thead", {}, el("tr", {}, ["Runs", "Methods", "Top-k overlap (mean over eval examples)", "Spearman ρ of net influence"]
      .map((h) => el("th", { scope: "col" }, h)))),
    el("tbody", {}, agreement.pairs.map((pair) => el("tr", {},
      el("td", {}, `${name(pair.runs[0])} vs ${name(pair.runs[1])}`),
      el("td", {}, pair.methods.join(" / ")),
      el("td", { class: "num" }, pair.mean_top_k_overlap === null ? "—" : `${(pair.mean_top_k_overlap * 100).toFixed(0)}%`),
      el("td", { class: "num" }, figure(pair.net_influence_spearman))))));
}

export async function renderCompare(view, ids) {
  view.append(el("h1", {}, "Compare experiments"));
  const query = new URLSearchParams({ ids: ids.join(",") });
  const comparison = await api("GET", `/api/compare?${query}`);
  const names = comparison.runs.map((run) => run.name || run.job_id.slice(0, 8));
  const chart = el("div", { id: "compare-loss", class: "chart", role: "img", "aria-label": "Training loss by step, one line per experiment" });
  view.append(
    el("p", {}, comparison.runs.map((run, i) => [i ? " · " : "",
      el("a", { href: `#/jobs/${encodeURIComponent(run.job_id)}` }, names[i]), ` (${run.status})`])),
    el("section", { class: "card" }, el("h2", {}, "Settings"), configTable(comparison.config_diff, names)),
    el("section", { class: "card" }, el("h2", {}, "Training loss"), chart),
    el("section", { class: "card" }, el("h2", {}, "Metrics"), metricsTable(comparison.metrics, names)),
    el("section", { class: "card" }, el("h2", {}, "Influence agreement"),
      el("p", { class: "help" }, "Top-k overlap: the share of the most helpful training examples two runs have in common for an eval example. Spearman ρ: the rank correlation of each training example's influence summed over the eval examples."),
      agreementSection(comparison.influence_agreement, comparison.ids, names)),
    el("section", { class: "card" }, el("h2", {}, "Answers"), answersTable(comparison.examples, names)));
  await plotLossCurves(chart, comparison.loss_curves.map((points, i) => ({ name: names[i], points })));
}
