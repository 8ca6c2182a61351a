// The caller's usage against the admission limits of their backend (GET /api/usage).

import { api } from "../api.js";
import { BACKEND_NAMES, el } from "../ui.js";

function amount(value) {
  return Number(value).toLocaleString("en-US", { maximumFractionDigits: 0 });
}

export async function renderUsage(view) {
  let usage;
  try {
    usage = await api("GET", "/api/usage");
  } catch (error) {
    // The experiments list stays usable when usage cannot be read.
    view.append(el("p", { class: "empty", id: "usage" }, `Usage is not available: ${error.message}`));
    return;
  }
  const items = usage.limits.map((entry) =>
    el("li", { "data-limit": entry.name },
      `${entry.description}: `,
      el("strong", {}, entry.limit ? `${amount(entry.used)} of ${amount(entry.limit)}` : `${amount(entry.used)} (no limit)`)));
  if (usage.max_job_time_s) {
    items.push(el("li", { "data-limit": "max_job_time_s" }, `longest job: ${amount(usage.max_job_time_s)} s estimated`));
  }
  view.append(el("section", { id: "usage", "aria-labelledby": "usage-heading" },
    el("h2", { id: "usage-heading" }, `Your usage (${BACKEND_NAMES[usage.backend] || usage.backend})`),
    el("ul", {}, items)));
}
