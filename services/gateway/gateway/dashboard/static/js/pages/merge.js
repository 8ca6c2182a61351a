// Merged weights: the experiment's adapter merged into its base model (POST /api/jobs/{id}/merges),
// written as a plain transformers folder (merged/) that loads with from_pretrained and no peft.
// The estimate shows before anything is submitted; the merge is a job with progress over SSE; once
// done, the check (the merged files' eval losses against the fine-tuned model's) and one archive
// download of the folder. An earlier merge of the experiment is shown on load.

import { api, apiBlob, followProgress } from "../api.js";
import { announce, bytes, download, duration, el, usd } from "../ui.js";

function mergesUrl(jobId, suffix = "") {
  return `/api/jobs/${encodeURIComponent(jobId)}/merges${suffix}`;
}

function checkLine(check) {
  const worst = check.max_relative_difference.toExponential(1);
  if (check.passed === null) return `The merged model's eval losses differ from the experiment's by up to ${worst} (relative): not expected to match, see the note.`;
  return check.passed
    ? `✓ The merged files reproduce the fine-tuned eval losses (largest relative difference ${worst}, tolerance ${check.tolerance}).`
    : `✗ The merged files do not reproduce the fine-tuned eval losses: relative difference ${worst}, over the tolerance ${check.tolerance}.`;
}

function doneView(merge) {
  const result = merge.result;
  const archive = el("button", { type: "button", id: "merge-download" }, "Download merged weights (zip)");
  archive.addEventListener("click", async () => {
    archive.disabled = true;
    announce(`Downloading ${result.files.length} files as one archive…`);
    try {
      const path = `/api/jobs/${encodeURIComponent(merge.merge_job_id)}/artifacts.zip?prefix=merged%2F`;
      download(`merged-${merge.parent_job_id.slice(0, 8)}.zip`, await apiBlob(path), "application/zip");
      announce("Downloaded the merged weights");
    } catch (err) {
      announce(`The download failed: ${err.message}`, "error");
    } finally {
      archive.disabled = false;
    }
  });
  return el("div", { id: "merge-result" },
    el("p", {}, `${result.base_model} with the adapter merged in: ${result.parameters.toLocaleString()} parameters, ${result.dtype}, ${bytes(result.weight_bytes)} in ${result.shards} shard${result.shards === 1 ? "" : "s"} (merged on ${result.merged_on}).`),
    el("p", { id: "merge-check", class: result.check.passed === false ? "error" : "" }, checkLine(result.check)),
    result.notes.map((note) => el("p", { class: "help merge-note" }, note)),
    el("div", { class: "actions" }, archive),
    el("details", {}, el("summary", {}, `The ${result.files.length} files of merged/`),
      el("ul", { id: "merge-files" }, result.files.map((name) => el("li", {}, el("code", {}, `merged/${name}`))))));
}

// The merged-weights controls of a completed experiment: a button for the Download card's row that
// opens the panel (estimate, merge, progress, result) placed under it. The panel opens by itself
// when the experiment already has a merge.
export function mergeControls(jobId) {
  const open = el("button", { type: "button", id: "merge-open", "aria-expanded": "false", "aria-controls": "merge" },
    "Merged weights…");
  const run = el("button", { type: "button", id: "merge-run", disabled: true }, "Merge the adapter into the base");
  const estimateBox = el("p", { id: "merge-estimate", class: "help", "aria-live": "polite" }, "Estimating…");
  const bar = el("progress", { id: "merge-progress", max: 100, value: 0 });
  const stage = el("p", { id: "merge-stage", class: "help" });
  const progressBox = el("div", { id: "merge-running", hidden: true },
    el("label", { for: "merge-progress" }, "Merge progress"), el("div", { class: "progress-row" }, bar), stage);
  const error = el("p", { id: "merge-error", class: "error", role: "alert", hidden: true });
  const outcome = el("div", { id: "merge-outcome" });

  function showError(message) {
    error.textContent = message;
    error.hidden = !message;
  }

  async function show(mergeId) {
    const merge = await api("GET", mergesUrl(jobId, `/${encodeURIComponent(mergeId)}`));
    if (merge.status !== "completed") {
      showError(`The merge ${merge.status}${merge.error ? `: ${merge.error}` : ""}`);
      return;
    }
    outcome.replaceChildren(doneView(merge));
  }

  async function follow(mergeId) {
    progressBox.hidden = false;
    bar.value = 0;
    await followProgress(mergeId, bar, stage);
    progressBox.hidden = true;
    await show(mergeId);
    announce("The merge finished");
  }

  run.addEventListener("click", async () => {
    run.disabled = true;
    showError("");
    try {
      const submitted = await api("POST", mergesUrl(jobId), { body: {},
        headers: { "Idempotency-Key": crypto.randomUUID() } });
      await follow(submitted.merge_job_id);
    } catch (err) {
      showError(err.message);
    } finally {
      run.disabled = false;
    }
  });

  let estimated = false;
  async function estimate() {
    if (estimated) return;
    estimated = true;
    const answer = await api("POST", mergesUrl(jobId, "/estimate"), { body: {} });
    const figures = answer.estimates[0];
    // The merge's own notes (size, shards, quantization, host memory), not the model card's.
    const notes = figures ? figures.notes.filter((note) => /weights|merged|host memory/.test(note)) : answer.notes;
    estimateBox.textContent = figures
      ? `About ${duration(figures.estimated_time_s)}, ${usd(figures.estimated_cost_usd)} on ${figures.gpu}: ${notes.join("; ")}.`
      : notes.join("; ");
    run.disabled = false;
  }

  const panel = el("div", { id: "merge", class: "merge-panel", hidden: true, "aria-labelledby": "merge-heading" },
    el("h3", { id: "merge-heading" }, "Merged weights"),
    el("p", { class: "help" }, "The LoRA adapter merged into the base model: safetensors shards, config and tokenizer that load with AutoModelForCausalLM.from_pretrained, checked against this experiment's fine-tuned eval losses. A 4-bit experiment merges onto the 16-bit base."),
    el("div", { class: "actions" }, run), estimateBox, error, progressBox, outcome);

  function reveal() {
    panel.hidden = false;
    open.setAttribute("aria-expanded", "true");
    estimate().catch((err) => showError(err.message));
  }
  open.addEventListener("click", () => (panel.hidden ? reveal() : (panel.hidden = true, open.setAttribute("aria-expanded", "false"))));

  api("GET", mergesUrl(jobId)).then(async ({ merges }) => {
    const latest = merges[0];
    if (!latest || ["failed", "cancelled"].includes(latest.status)) return;
    reveal();
    if (latest.status === "completed") await show(latest.merge_job_id);
    else await follow(latest.merge_job_id);
  }).catch((err) => showError(err.message));
  return [open, panel];
}
