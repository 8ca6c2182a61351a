// An experiment's name, tags and note on its page, editable (PATCH /api/jobs/<id>).

import { api } from "./api.js";
import { announce, el } from "./ui.js";

export function labelsSection(job, onSaved) {
  const name = el("input", { type: "text", id: "label-name", value: job.name || "", maxlength: 200 });
  const tags = el("input", { type: "text", id: "label-tags", value: job.tags.join(", "), placeholder: "lr-sweep, baseline" });
  const note = el("input", { type: "text", id: "label-note", value: job.note || "", maxlength: 4000 });
  const problems = el("ul", { class: "errors", id: "label-errors" });
  const form = el("form", { class: "card labels", id: "labels-form", "aria-labelledby": "labels-heading" },
    el("h2", { id: "labels-heading", class: "visually-hidden" }, "Name, tags and note"),
    el("div", { class: "filters" },
      el("div", { class: "field" }, el("label", { for: "label-name" }, "Name"), name),
      el("div", { class: "field" }, el("label", { for: "label-tags" }, "Tags (comma-separated)"), tags),
      el("div", { class: "field note" }, el("label", { for: "label-note" }, "Note"), note),
      el("div", { class: "field" }, el("span", {}, "\u00a0"), el("button", { type: "submit", id: "save-labels" }, "Save"))),
    problems);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    problems.replaceChildren();
    const body = {
      name: name.value.trim() || null,
      tags: tags.value.split(",").map((tag) => tag.trim()).filter(Boolean),
      note: note.value.trim() || null,
    };
    try {
      const saved = await api("PATCH", `/api/jobs/${encodeURIComponent(job.job_id)}`, { body });
      announce("Saved the name, tags and note");
      onSaved(saved);
    } catch (error) {
      const details = error.problems?.length ? error.problems : [{ field: "", message: error.message }];
      problems.replaceChildren(...details.map((p) => el("li", {}, p.field ? `${p.field}: ${p.message}` : p.message)));
      announce("The labels were not saved", "error");
    }
  });
  return form;
}
