// The experiments list: name, tags, outcome and run time per experiment, filters by tag, model,
// method and status (kept in the URL: #/jobs?tag=x), and 2-4 ticked experiments to compare.

import { api } from "../api.js";
import { actualCostCell, actualCostTitle } from "../cost.js";
import { BACKEND_NAMES, dateTime, duration, el, usd } from "../ui.js";
import { renderUsage } from "./usage.js";

const FILTERS = [
  ["tag", "Tag", "text"],
  ["model", "Model", "text"],
  ["method", "Method", ["tracin", "datainf", "kronfluence", "trackstar"]],
  ["status", "Status", ["queued", "submitted", "running", "completed", "failed", "cancelled"]],
];

function percent(rate) {
  return `${(rate * 100).toFixed(0)}%`;
}

// Fine-tuned exact match and mean loss, each against the base model's.
export function outcomeCell(outcome) {
  const { base, finetuned: tuned } = outcome || {};
  if (!base || !tuned) return el("td", { class: "outcome" }, "—");
  const better = tuned.mean_loss < base.mean_loss;
  return el("td", { class: "outcome" },
    el("div", {}, `EM ${percent(tuned.exact_match_rate)} `, el("span", { class: "help" }, `(base ${percent(base.exact_match_rate)})`)),
    el("div", { class: better ? "ok" : "error" }, `loss ${tuned.mean_loss.toFixed(3)} `,
      el("span", { class: "help" }, `(base ${base.mean_loss.toFixed(3)})`)));
}

function filterForm(current) {
  const fields = FILTERS.map(([name, label, kind]) => {
    const id = `filter-${name}`;
    const input = Array.isArray(kind)
      ? el("select", { id, name }, el("option", { value: "" }, "any"),
        kind.map((value) => el("option", { value, selected: current.get(name) === value }, value)))
      : el("input", { id, name, type: "text", value: current.get(name) || "", size: 14 });
    return el("div", { class: "field" }, el("label", { for: id }, label), input);
  });
  const form = el("form", { id: "jobs-filters", class: "filters", role: "search" },
    fields, el("div", { class: "field" }, el("span", {}, "\u00a0"), el("button", { type: "submit" }, "Filter")));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const query = new URLSearchParams();
    for (const [name] of FILTERS) {
      const value = form.elements[name].value.trim();
      if (value) query.set(name, value);
    }
    const text = query.toString();
    window.location.hash = text ? `#/jobs?${text}` : "#/jobs";
  });
  return form;
}

export async function renderJobs(view, query = new URLSearchParams()) {
  view.append(
    el("h1", {}, "Experiments"),
    el("p", {}, el("a", { href: "#/new", class: "button" }, "New experiment")),
  );
  await renderUsage(view);
  const filters = new URLSearchParams();
  for (const [name] of FILTERS) if (query.get(name)) filters.set(name, query.get(name));
  view.append(filterForm(filters));
  filters.set("limit", "200");
  const { jobs } = await api("GET", `/api/jobs?${filters}`);
  if (!jobs.length) {
    view.append(el("p", { class: "empty" }, filters.size > 1
      ? "No experiment matches these filters."
      : "No experiments yet. Start one with “New experiment”."));
    return;
  }
  const compare = el("button", { type: "button", id: "compare-selected", disabled: true }, "Compare selected");
  const picked = () => [...view.querySelectorAll("input.pick:checked")].map((box) => box.value);
  compare.addEventListener("click", () => {
    window.location.hash = `#/compare/${picked().map(encodeURIComponent).join(",")}`;
  });
  const rows = jobs.map((job) => {
    const pick = el("input", { type: "checkbox", class: "pick", value: job.job_id,
      "aria-label": `Compare ${job.name || job.job_id.slice(0, 8)}` });
    pick.addEventListener("change", () => {
      const count = picked().length;
      compare.disabled = count < 2 || count > 4;
      compare.textContent = count ? `Compare selected (${count})` : "Compare selected";
    });
    return el("tr", { "data-job-id": job.job_id },
      el("td", {}, pick),
      el("td", {},
        el("a", { href: `#/jobs/${encodeURIComponent(job.job_id)}` }, job.name || job.job_id.slice(0, 8)),
        job.name ? el("div", { class: "help" }, el("code", {}, job.job_id.slice(0, 8))) : null,
        job.note ? el("div", { class: "help note" }, job.note.length > 80 ? `${job.note.slice(0, 80)}…` : job.note) : null),
      el("td", {}, job.tags.map((tag) =>
        el("a", { class: "tag", href: `#/jobs?tag=${encodeURIComponent(tag)}` }, tag))),
      el("td", {}, el("span", { class: `badge status-${job.status}` }, job.status)),
      outcomeCell(job.outcome),
      el("td", {}, job.model_id, el("div", { class: "help" }, job.influence_method)),
      el("td", { class: "num" }, job.run_time_s === null ? "—" : duration(job.run_time_s)),
      el("td", {}, BACKEND_NAMES[job.backend] || job.backend, el("div", { class: "help" }, `est. ${usd(job.estimated_cost_usd)}`)),
      el("td", { class: "num actual-cost", title: actualCostTitle(job) }, actualCostCell(job)),
      el("td", {}, dateTime(job.created_at)),
    );
  });
  view.append(
    el("div", { class: "actions" }, compare,
      el("span", { class: "help" }, "Tick 2 to 4 experiments to compare their settings, metrics and answers.")),
    el("table", { class: "data", id: "jobs-table" },
      el("caption", { class: "visually-hidden" }, "Your experiments, newest first"),
      el("thead", {}, el("tr", {},
        ...["", "Experiment", "Tags", "Status", "Outcome (fine-tuned)", "Model / method", "Run time", "Backend", "Actual cost", "Created"]
          .map((h) => el("th", { scope: "col" }, h)))),
      el("tbody", {}, rows)));
}
