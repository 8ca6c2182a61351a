// The job page: live progress over SSE (resumed from the last seen event after a reload),
// loss curve, ETA, cancel, errors in plain words, and the results once the job completes.

import { api, jobEvents } from "../api.js";
import { actualCostText } from "../cost.js";
import { labelsSection } from "../labels.js";
import { trackingFacts } from "./tracking.js";
import { announce, BACKEND_NAMES, dateTime, duration, el, plotLossCurves, usd } from "../ui.js";
import { renderResults } from "./results.js";

const TERMINAL = new Set(["completed", "failed", "cancelled"]);
const RECONNECT_MS = 3000;
const STAGES = {
  waiting_for_gpu: "Waiting for a GPU worker (a cold start can take 30-120 s)",
  queued: "Queued for a free device",
  starting: "Starting the worker",
  loading_model: "Loading the model",
  eval_base: "Evaluating the base model",
  eval_few_shot: "Evaluating the base model with few-shot examples",
  training: "Fine-tuning (LoRA)",
  eval_finetuned: "Evaluating the fine-tuned model",
  influence: "Scoring the influence of each training example",
};
const STATUS_STAGES = {
  queued: "Waiting for a GPU worker",
  submitted: "Waiting for a GPU worker (a cold start can take 30-120 s)",
  completed: "Done",
  failed: "Failed",
  cancelled: "Cancelled",
};
// RunPod's and the scheduler's messages, sorted into the cases a researcher can act on.
const ERROR_KINDS = [
  { test: /no gpu|throttled|capacity|unhealthy/i, title: "No GPU was available",
    hint: "RunPod had no GPU free in this job's GPU pools. Run it again later, on every GPU type that fits, or on the hosted backend." },
  { test: /time ?out|timed out|exceeded|expired/i, title: "The job ran out of time",
    hint: "It ran past the execution limit. Use fewer examples, fewer epochs or a shorter max sequence length." },
  { test: /balance|funds|credit/i, title: "Your RunPod balance is too low",
    hint: "Add credits at runpod.io, then start the experiment again." },
  { test: /invalid.*key|api key|unauthori[sz]ed|permission|forbidden/i, title: "Your RunPod API key was refused",
    hint: "Check or replace the key in Settings → Compute." },
];

export function explainError(message) {
  const kind = ERROR_KINDS.find((k) => k.test.test(message || ""));
  return kind ? { title: kind.title, hint: kind.hint } : { title: "The experiment failed", hint: "" };
}

function cacheKey(jobId) {
  return `influence.progress.${jobId}`;
}

function emptyProgress() {
  return { lastSeq: 0, progress: 0, stage: "", message: "", epoch: null, totalEpochs: null,
    etaS: null, startedAt: null, loss: [], parts: null };
}

// A sharded experiment's parts (the training job, each index shard, the merge) as rows.
function partName(part, shards) {
  if (part.kind === "training") return "Training job";
  if (part.kind === "shard_merge") return "Merge";
  return `Index shard ${part.shard + 1} of ${shards}`;
}

function partsRows(parts, shards) {
  return parts.map((part) => {
    const value = Math.round((part.status === "completed" ? 1 : part.progress || 0) * 100);
    const meter = el("progress", { max: 100, value, "aria-label": `${partName(part, shards)} progress` });
    return el("tr", { "data-kind": part.kind, "data-shard": part.shard ?? "" },
      el("th", { scope: "row" }, partName(part, shards)),
      el("td", { class: `part-status status-${part.status}` }, part.status),
      el("td", {}, meter, ` ${value}%`),
      el("td", { class: "num" }, String(part.attempts)),
      el("td", {}, part.error || ""));
  });
}

export async function renderJob(view, jobId) {
  let job = await api("GET", `/api/jobs/${encodeURIComponent(jobId)}`);
  const cached = JSON.parse(sessionStorage.getItem(cacheKey(jobId)) || "null");
  const state = cached || emptyProgress();
  const abort = new AbortController();
  let retryTimer = null;
  let lossFrame = 0;

  const statusBadge = el("span", { class: "badge", id: "job-status" });
  const bar = el("progress", { id: "job-progress", max: 100, value: 0 });
  const percent = el("span", { id: "job-percent", class: "num" });
  const stage = el("p", { id: "job-stage", class: "stage" });
  const epoch = el("span", { id: "job-epoch" });
  const eta = el("span", { id: "job-eta" });
  const errorBox = el("div", { id: "job-error", role: "alert" });
  const cancel = el("button", { type: "button", id: "cancel-job", class: "danger" }, "Cancel experiment");
  // Offered while RunPod has no GPU for the job, or once it gave up for that reason.
  const moveToHosted = el("button", { type: "button", id: "move-to-hosted", hidden: true },
    "Run it on the hosted backend instead");
  // ... or to offer RunPod every GPU type that fits the model, past the price band.
  const widenPools = el("button", { type: "button", id: "widen-pools", hidden: true },
    "Try every GPU type that fits");
  const chart = el("div", { id: "loss-chart", class: "chart", role: "img", "aria-label": "Training loss by step" });
  const resultsHost = el("div", { id: "results" });
  const actualCost = el("dd", { id: "job-actual-cost" });
  const partsBody = el("tbody", {});
  const partsSection = el("section", { class: "card", id: "job-parts", "aria-labelledby": "parts-heading",
    hidden: !(job.shards > 1) },
    el("h2", { id: "parts-heading" }, `Parts (${job.shards} index shards)`),
    el("p", { class: "help" }, "A sharded experiment runs as a training job, its index shards "
      + "(at once where the backend allows) and a merge. A shard that fails runs again alone."),
    el("table", { class: "data" },
      el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "Part"), el("th", { scope: "col" }, "Status"),
        el("th", { scope: "col" }, "Progress"), el("th", { scope: "col" }, "Attempts"),
        el("th", { scope: "col" }, "Error"))),
      partsBody));
  const tracked = el("dd", { id: "job-tracking" });

  const heading = el("h1", {}, job.name || `Experiment ${jobId.slice(0, 8)}`);
  view.append(
    heading,
    el("section", { class: "card", "aria-labelledby": "progress-heading" },
      el("h2", { id: "progress-heading" }, "Progress"),
      el("dl", { class: "facts" },
        el("dt", {}, "Status"), el("dd", {}, statusBadge),
        el("dt", {}, "Backend"), el("dd", {}, `${BACKEND_NAMES[job.backend] || job.backend} (${job.provider})`),
        el("dt", {}, "Model"), el("dd", {}, job.model_id),
        el("dt", {}, "Influence method"), el("dd", {}, job.influence_method),
        el("dt", {}, "Examples"), el("dd", {}, `${job.n_train} training, ${job.n_eval} eval`),
        el("dt", {}, "Estimate"), el("dd", {}, `${duration(job.estimated_time_s)}, ${usd(job.estimated_cost_usd)}`),
        el("dt", {}, "Actual cost"), actualCost,
        el("dt", {}, "Tracked in"), tracked,
        el("dt", {}, "Created"), el("dd", {}, dateTime(job.created_at))),
      el("label", { for: "job-progress" }, "Overall progress"),
      el("div", { class: "progress-row" }, bar, percent),
      stage,
      el("p", { class: "help" }, epoch, " ", eta),
      errorBox,
      el("div", { class: "actions" }, cancel, widenPools, moveToHosted)),
    partsSection,
    labelsSection(job, (saved) => { heading.textContent = saved.name || `Experiment ${jobId.slice(0, 8)}`; }),
    el("section", { class: "card" }, el("h2", {}, "Training loss"), chart),
    resultsHost);

  function save() {
    sessionStorage.setItem(cacheKey(jobId), JSON.stringify(state));
  }

  async function drawLoss(points) {
    if (!points.length) {
      chart.replaceChildren(el("p", { class: "help" }, TERMINAL.has(job.status)
        ? "No training loss to show for this experiment."
        : "The loss curve appears once training starts."));
      return;
    }
    await plotLossCurves(chart, [{ name: "loss", points }]);
  }

  // At most one chart redraw per frame, however many loss points a burst of events brings.
  function redrawLossSoon() {
    if (lossFrame) return;
    lossFrame = requestAnimationFrame(() => {
      lossFrame = 0;
      drawLoss(state.loss);
    });
  }

  function show() {
    const terminal = TERMINAL.has(job.status);
    statusBadge.textContent = job.status;
    actualCost.textContent = actualCostText(job);
    tracked.replaceChildren(trackingFacts(job.tracking));
    statusBadge.className = `badge status-${job.status}`;
    const value = job.status === "completed" ? 100 : Math.round(Math.max(state.progress, job.progress || 0) * 100);
    bar.value = value;
    bar.setAttribute("aria-valuetext", `${value}%`);
    percent.textContent = `${value}%`;
    const stageName = terminal ? STATUS_STAGES[job.status] : (STAGES[state.stage] || STATUS_STAGES[job.status] || state.stage);
    stage.textContent = stageName + (!terminal && state.message ? ` — ${state.message}` : "");
    const metrics = job.metrics || {};
    const e = state.epoch ?? metrics.epoch;
    const total = state.totalEpochs ?? metrics.total_epochs;
    epoch.textContent = e && total ? `Epoch ${e} / ${total}.` : "";
    eta.textContent = terminal ? "" : etaText();
    cancel.hidden = terminal;
    const parts = terminal || !state.parts ? job.parts : state.parts;
    if (job.shards > 1 && parts && parts.length) partsBody.replaceChildren(...partsRows(parts, job.shards));
    const noGpu = job.backend === "runpod"
      && /^no gpu/i.test(job.status === "failed" ? job.error || "" : job.stage_message || "");
    moveToHosted.hidden = !noGpu || job.status === "cancelled" || job.status === "completed";
    widenPools.hidden = moveToHosted.hidden;
    if (job.status === "failed") {
      const { title, hint } = explainError(job.error);
      errorBox.replaceChildren(el("h3", {}, title), el("p", {}, job.error || "No reason was given."),
        hint ? el("p", {}, hint) : null);
      errorBox.className = "error-box";
    }
  }

  // The same experiment on the hosted backend: this one cancelled (if it still waits), the
  // researcher's backend switched to hosted (said in the question), the spec submitted again.
  moveToHosted.addEventListener("click", async () => {
    if (!window.confirm("Switch your experiments to the hosted backend and run this one there? " +
      "You can switch back in Settings → Compute.")) return;
    moveToHosted.disabled = true;
    try {
      if (!TERMINAL.has(job.status)) await api("POST", `/api/jobs/${encodeURIComponent(jobId)}/cancel`);
      await api("PUT", "/api/settings/compute", { body: { backend: "hosted" } });
      const { runpod_gpu: _pool, ...spec } = await api("GET", `/api/jobs/${encodeURIComponent(jobId)}/spec`);
      const submitted = await api("POST", "/api/train", { body: spec });
      announce("Experiment submitted again on the hosted backend");
      window.location.hash = `#/jobs/${submitted.job_id}`;
    } catch (error) {
      announce(`Not moved: ${error.message}`, "error");
      moveToHosted.disabled = false;
    }
  });

  // The same experiment on every RunPod GPU type that fits (the spec's runpod_gpu "all-fitting"):
  // its price range shown and confirmed first, then this one cancelled (if it still waits) and
  // the widened spec submitted as a new job (its pools fixed before its submit, like any job's).
  widenPools.addEventListener("click", async () => {
    widenPools.disabled = true;
    try {
      const spec = { ...await api("GET", `/api/jobs/${encodeURIComponent(jobId)}/spec`), runpod_gpu: "all-fitting" };
      const answer = await api("POST", "/api/estimate", { body: spec });
      const runpod = answer.estimates.find((e) => e.backend === "runpod") || answer.estimates[0];
      const range = runpod.notes.find((note) => note.startsWith("Billed at the GPU RunPod assigns"))
        || `Priced at ${runpod.gpu}: ${usd(runpod.estimated_cost_usd)}.`;
      if (!window.confirm(`Run this experiment again on every RunPod GPU type that fits?\n\n${range}`)) {
        widenPools.disabled = false;
        return;
      }
      if (!TERMINAL.has(job.status)) await api("POST", `/api/jobs/${encodeURIComponent(jobId)}/cancel`);
      const submitted = await api("POST", "/api/train", { body: spec });
      announce("Experiment submitted again on every GPU type that fits");
      window.location.hash = `#/jobs/${submitted.job_id}`;
    } catch (error) {
      announce(`Not widened: ${error.message}`, "error");
      widenPools.disabled = false;
    }
  });

  function etaText() {
    if (state.stage === "training" && state.etaS !== null && state.etaS !== undefined) {
      return `About ${duration(state.etaS)} left in training.`;
    }
    if (state.startedAt && state.progress > 0.05) {
      const elapsed = (Date.now() - Date.parse(state.startedAt)) / 1000;
      return `About ${duration((elapsed * (1 - state.progress)) / state.progress)} left.`;
    }
    return job.estimated_time_s ? `Estimated total: ${duration(job.estimated_time_s)}.` : "";
  }

  function apply(event) {
    state.lastSeq = Math.max(state.lastSeq, event.seq || 0);
    if (event.type === "status" && event.state) job.status = event.state;
    if (event.stage) state.stage = event.stage;
    if (event.message) state.message = event.message;
    if (event.type === "progress") {
      if (Array.isArray(event.parts)) state.parts = event.parts;
      state.progress = Math.max(state.progress, event.progress || 0);
      state.startedAt = state.startedAt || event.time;
      if (event.epoch !== null && event.epoch !== undefined) state.epoch = event.epoch;
      if (event.total_epochs) state.totalEpochs = event.total_epochs;
      state.etaS = event.eta_s ?? null;
      if (event.loss !== null && event.loss !== undefined && event.step !== null) {
        state.loss.push({ step: event.step, loss: event.loss });
        redrawLossSoon();
      }
    }
  }

  async function finish() {
    sessionStorage.removeItem(cacheKey(jobId));
    job = await api("GET", `/api/jobs/${encodeURIComponent(jobId)}`);
    show();
    if (job.status === "completed") {
      announce("The experiment completed");
      const result = await api("GET", `/api/jobs/${encodeURIComponent(jobId)}/results`);
      if (!view.isConnected || abort.signal.aborted) return;
      await drawLoss(result.training.loss_curve.map((p) => ({ step: p.step, loss: p.loss })));
      await renderResults(resultsHost, jobId, result);
    } else {
      drawLoss(state.loss);
      announce(`The experiment ${job.status}`, job.status === "failed" ? "error" : "info");
    }
  }

  async function follow() {
    try {
      for await (const message of jobEvents(jobId, state.lastSeq, abort.signal)) {
        if (message.event === "end") {
          await finish();
          return;
        }
        if (message.event === "error") throw new Error(message.data.message);
        apply(message.data);
        save();
        show();
      }
      throw new Error("The progress stream closed early");
    } catch (error) {
      if (abort.signal.aborted) return;
      // Resume after the last event seen: nothing is replayed twice.
      announce(`${error.message}; reconnecting…`, "error");
      retryTimer = setTimeout(follow, RECONNECT_MS);
    }
  }

  cancel.addEventListener("click", async () => {
    cancel.disabled = true;
    try {
      job = await api("POST", `/api/jobs/${encodeURIComponent(jobId)}/cancel`);
      // The stream's end may already have announced the outcome; say the same, never older news.
      announce(TERMINAL.has(job.status) ? `The experiment ${job.status}` : "Cancel requested");
      show();
    } catch (error) {
      announce(`Could not cancel: ${error.message}`, "error");
    } finally {
      cancel.disabled = false;
    }
  });

  show();
  // A completed job draws its loss curve from the results instead.
  if (job.status !== "completed") drawLoss(state.loss);
  if (TERMINAL.has(job.status)) {
    await finish();
  } else {
    follow();
  }
  return () => {
    abort.abort();
    clearTimeout(retryTimer);
    cancelAnimationFrame(lossFrame);
  };
}
