// The experiments list.

import { api } from "../api.js";
import { actualCostCell, actualCostTitle } from "../cost.js";
import { BACKEND_NAMES, dateTime, el, usd } from "../ui.js";
import { renderUsage } from "./usage.js";

export async function renderJobs(view) {
  view.append(
    el("h1", {}, "Experiments"),
    el("p", {}, el("a", { href: "#/new", class: "button" }, "New experiment")),
  );
  await renderUsage(view);
  const { jobs } = await api("GET", "/api/jobs?limit=200");
  if (!jobs.length) {
    view.append(el("p", { class: "empty" }, "No experiments yet. Start one with “New experiment”."));
    return;
  }
  const rows = jobs.map((job) =>
    el("tr", {},
      el("td", {}, el("a", { href: `#/jobs/${encodeURIComponent(job.job_id)}` }, job.job_id.slice(0, 8))),
      el("td", {}, el("span", { class: `badge status-${job.status}` }, job.status)),
      el("td", {}, BACKEND_NAMES[job.backend] || job.backend, job.provider ? ` (${job.provider})` : ""),
      el("td", {}, job.model_id),
      el("td", {}, job.influence_method),
      el("td", { class: "num" }, usd(job.estimated_cost_usd)),
      el("td", { class: "num actual-cost", title: actualCostTitle(job) }, actualCostCell(job)),
      el("td", {}, dateTime(job.created_at)),
    ));
  view.append(el("table", { class: "data", id: "jobs-table" },
    el("caption", { class: "visually-hidden" }, "Your experiments, newest first"),
    el("thead", {}, el("tr", {},
      ...["Job", "Status", "Backend", "Model", "Method", "Est. cost", "Actual cost", "Created"].map((h) => el("th", { scope: "col" }, h)))),
    el("tbody", {}, rows)));
}
