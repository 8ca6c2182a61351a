// New experiment: model picker with per-backend prices, data upload with validation in the page,
// hyperparameters, influence method, a live cost estimate, submit.

import { api, apiBlob } from "../api.js";
import { KINDS, readDataFile, withIds } from "../datafile.js";
import {
  applyPresets, hyperparamSpecs, sampleButton, schemaNumberField, specNumberSpecs, targetModules,
  targetModulesField,
} from "../specform.js";
import { announce, BACKEND_NAMES, duration, el, usd } from "../ui.js";

const ESTIMATE_DELAY_MS = 400;

// influence.projection_dim: optional; empty keeps exact TracIn (TrackStar then uses 4,096).
const PROJECTION_DIM = { name: "projection_dim", label: "Projection dimensions (optional)", min: 16, max: 65536, step: 1,
  help: "Compress each training example's gradient to this many numbers, saved as a reusable index: memory stays flat with 100,000 examples; scores become close approximations. Empty: exact." };
const EXAMPLE_FILES = [
  ["train.jsonl", "Training examples (JSONL)"], ["train.csv", "Training examples (CSV)"],
  ["eval.jsonl", "Eval examples (JSONL)"], ["eval.csv", "Eval examples (CSV)"],
  ["chat_train.jsonl", "Training examples (chat messages)"], ["chat_eval.jsonl", "Eval examples (chat messages)"],
];

function projectionField() {
  const id = `influence-${PROJECTION_DIM.name}`;
  return el("div", { class: "field" },
    el("label", { for: id }, PROJECTION_DIM.label),
    el("input", { id, name: PROJECTION_DIM.name, type: "number", min: PROJECTION_DIM.min, max: PROJECTION_DIM.max,
      step: PROJECTION_DIM.step, inputmode: "numeric", placeholder: "exact", "aria-describedby": `${id}-help` }),
    el("span", { class: "help", id: `${id}-help` }, PROJECTION_DIM.help));
}

function priceCell(price, active) {
  if (!price) return el("td", { class: active ? "" : "inactive" }, "not offered");
  const rate = price.usd_per_hour === 0
    ? "no GPU charge"
    : `${usd(price.usd_per_hour, 3)}/h · ${usd(price.usd_per_second, 5)}/s`;
  return el("td", { class: active ? "" : "inactive" }, `${price.gpu} · ${rate}`);
}

function modelPicker(models, activeBackend) {
  const select = el("select", { id: "model", name: "model_id", "aria-describedby": "model-table-caption" },
    models.map((m) => el("option", { value: m.id, disabled: !m.fits }, `${m.name} (${m.id})${m.fits ? "" : " — too large"}`)));
  const other = activeBackend === "runpod" ? "hosted" : "runpod";
  const rows = models.map((m) => el("tr", { "data-model": m.id },
    el("th", { scope: "row" }, m.name),
    el("td", {}, `${m.recommended_tier_gb} GB GPU (needs ~${m.required_memory_gb} GB)`),
    priceCell(m.prices[activeBackend], true),
    priceCell(m.prices[other], false)));
  const table = el("table", { class: "data compact", id: "model-prices" },
    el("caption", { id: "model-table-caption" },
      `GPU recommendation and prices. Active backend: ${BACKEND_NAMES[activeBackend]}; the other is greyed.`),
    el("thead", {}, el("tr", {},
      el("th", { scope: "col" }, "Model"), el("th", { scope: "col" }, "Recommended GPU"),
      el("th", { scope: "col" }, `${BACKEND_NAMES[activeBackend]} (active)`),
      el("th", { scope: "col", class: "inactive" }, BACKEND_NAMES[other]))),
    el("tbody", {}, rows));
  const highlight = () => {
    for (const row of table.tBodies[0].rows) row.classList.toggle("selected", row.dataset.model === select.value);
  };
  select.addEventListener("change", highlight);
  highlight();
  return { select, table };
}

function fileField(kind, onParsed) {
  const id = `file-${kind}`;
  const errorsId = `${id}-errors`;
  const input = el("input", { id, name: id, type: "file",
    accept: ".jsonl,.csv,.json,.parquet,text/csv,application/json",
    "aria-describedby": `${id}-help ${errorsId}` });
  const summary = el("p", { class: "help", id: `${id}-summary` });
  const errors = el("ul", { class: "errors", id: errorsId, role: "alert" });
  input.addEventListener("change", async () => {
    errors.replaceChildren();
    summary.textContent = "";
    const file = input.files[0];
    if (!file) return onParsed(null);
    summary.textContent = `Reading ${file.name}…`;
    const { examples, format, formatLabel, errors: problems, dataset } = await readDataFile(kind, file);
    if (problems.length) {
      summary.textContent = "";
      errors.append(...problems.map((p) => el("li", {}, `${file.name}: ${p}`)));
      onParsed(null);
      return;
    }
    const count = dataset ? dataset.count : examples.length;
    const stored = dataset ? ` Stored as dataset ${dataset.id} (too large to send with the experiment).` : "";
    summary.replaceChildren(`${file.name}: ${count.toLocaleString("en")} ${KINDS[kind].label} examples, all valid.${stored} `,
      el("span", { id: `${id}-format`, "data-format": format }, `Format: ${formatLabel}.`));
    // A stored dataset is named by id: {datasetId} in place of the examples.
    onParsed(dataset ? { datasetId: dataset.id } : examples, format);
  });
  const answer = KINDS[kind].answer;
  return el("div", { class: "field" },
    el("label", { for: id }, `${kind === "train" ? "Training" : "Eval"} data (JSONL or CSV)`),
    input,
    el("p", { class: "help", id: `${id}-help` },
      `JSONL, CSV (with a header row) or Parquet; one example per row, with "prompt" and "${answer}", `
      + `or chat "messages" (roles system, user, assistant${kind === "eval" ? "; the last assistant turn is the expected answer" : ""}), `
      + `or Alpaca "instruction", "input", "output"; optionally "id".`),
    summary, errors);
}

const TEMPLATES = [
  { value: "auto", label: "Automatic: the model's chat template for chat-shaped data, else raw text" },
  { value: "chat", label: "The model's chat template (the loss trains on the assistant's turns)" },
  { value: "raw", label: "Raw text: prompt followed by the answer" },
];

// The spec's `template` (gpu_core resolves auto when the model loads; the data check says how).
function templateField() {
  return el("div", { class: "field" },
    el("label", { for: "template" }, "Prompt template"),
    el("select", { id: "template", name: "template", "aria-describedby": "template-help" },
      TEMPLATES.map((t) => el("option", { value: t.value }, t.label))),
    el("p", { class: "help", id: "template-help" },
      "With a chat template, prompts are the templated conversation, few-shot demonstrations become earlier turns, and training and influence use the assistant's tokens only."));
}

function lengthRow(label, stats, maxSeqLen) {
  return el("tr", {},
    el("th", { scope: "row" }, label),
    ...["min", "median", "p95", "max"].map((key) => el("td", { class: "num" }, String(Math.round(stats[key])))),
    el("td", { class: "num" }, stats.truncated ? `${stats.truncated} of ${stats.n} over ${maxSeqLen}` : "none"));
}

// POST /api/estimate's data_report: template preview, token lengths, truncation, duplicates, copies.
function dataReportView(report) {
  const tokens = report.tokens;
  const parts = [];
  if (tokens.available) {
    const templateNames = { chat: "the model's chat template", raw: "raw text" };
    parts.push(el("p", { id: "data-template" }, `Rendered with ${templateNames[tokens.template]}.`));
    parts.push(el("table", { class: "data compact", id: "length-table" },
      el("caption", {}, "Tokens per example (with the model's tokenizer)"),
      el("thead", {}, el("tr", {}, ...["", "Min", "Median", "95th pct", "Max", "Truncated"].map((h) => el("th", { scope: "col" }, h)))),
      el("tbody", {}, lengthRow("Training", tokens.training, tokens.max_seq_len), lengthRow("Eval", tokens.eval, tokens.max_seq_len))));
    const truncated = [...tokens.training.truncated_examples, ...tokens.eval.truncated_examples];
    if (truncated.length) {
      parts.push(el("p", { id: "truncated-examples", class: "error" },
        `Truncated at max_seq_len ${tokens.max_seq_len}: `,
        truncated.map((e, i) => [i ? ", " : "", el("code", {}, e.id), ` (${e.tokens} tokens)`])));
    }
    parts.push(el("details", { id: "data-preview" },
      el("summary", {}, `Preview of ${tokens.preview.id} as the model sees it (trained tokens highlighted)`),
      el("pre", {}, tokens.preview.runs.map((run) => (run.trained ? el("mark", {}, run.text) : run.text)))));
  } else {
    parts.push(el("p", { class: "help", id: "tokens-unavailable" }, tokens.reason));
  }
  const findings = report.notes.filter((note) => !note.includes("will be truncated") && note !== tokens.reason);
  parts.push(findings.length
    ? el("ul", { class: "help", id: "data-findings" }, findings.map((note) => el("li", {}, note)))
    : el("p", { class: "help", id: "data-findings" }, "No duplicate examples, and no eval example copies a training example."));
  return parts;
}

function estimateView(answer) {
  const rows = answer.estimates.map((e) => {
    const active = e.backend === answer.active_backend;
    return el("tr", { class: active ? "" : "inactive" },
      el("th", { scope: "row" }, `${BACKEND_NAMES[e.backend] || e.backend}${active ? " (active)" : ""}`),
      el("td", {}, `${e.gpu} (${e.gpu_memory_gb} GB)`),
      el("td", { class: "num" }, duration(e.estimated_time_s)),
      el("td", { class: "num" }, `${usd(e.usd_per_second, 5)}/s`),
      el("td", { class: "num" }, usd(e.estimated_cost_usd)));
  });
  const notes = [...answer.notes, ...answer.estimates.filter((e) => e.backend === answer.active_backend).flatMap((e) => e.notes)];
  return [
    el("table", { class: "data compact", id: "estimate-table" },
      el("thead", {}, el("tr", {}, ...["Backend", "GPU", "Time", "Price", "Total"].map((h) => el("th", { scope: "col" }, h)))),
      el("tbody", {}, rows)),
    notes.length ? el("ul", { class: "help" }, notes.map((n) => el("li", {}, n))) : null,
  ];
}

// `fromJob`, `fromCuration`: start from that experiment's spec with the curation's training set.
export async function renderNewExperiment(view, [fromJob, fromCuration] = []) {
  const [{ models }, compute, config] = await Promise.all([
    api("GET", "/api/models"), api("GET", "/api/settings/compute"), api("GET", "/api/config")]);
  const schema = config.spec_schema;
  const hyperparamFields = hyperparamSpecs(schema);
  const data = { train: null, eval: null };
  let presetExtras = {};
  const formats = { train: null, eval: null };
  let idempotencyKey = crypto.randomUUID();
  let estimateTimer = null;
  let estimateAbort = null;

  const { select: modelSelect, table: modelTable } = modelPicker(models, compute.backend);
  const methodName = "influence_method";
  const methods = el("fieldset", {},
    el("legend", {}, "Influence method"),
    config.influence_methods.map((m) => el("div", { class: "radio" },
      el("input", { type: "radio", id: `method-${m.value}`, name: methodName, value: m.value,
        checked: m.value === schema.properties.influence_method.default,
        "aria-describedby": `method-${m.value}-cost` }),
      el("label", { for: `method-${m.value}` }, m.label),
      m.description ? el("span", { class: "help", id: `method-${m.value}-cost` }, ` — ${m.description}`) : null)));
  const dataReport = el("div", { id: "data-report", "aria-live": "polite" },
    el("p", { class: "help" }, "Upload training and eval data to see token lengths, truncation and duplicates."));
  const estimate = el("div", { id: "estimate", "aria-live": "polite" },
    el("p", { class: "help" }, "Upload training and eval data to see the time and cost."));
  const submit = el("button", { type: "submit", id: "submit-experiment", disabled: true }, "Start experiment");
  // Optional: the scheduler cancels the job when its cost so far reaches this (any backend).
  const spendCap = el("input", { type: "number", id: "max-cost", name: "max_cost_usd", min: 0.01, step: 0.01,
    inputmode: "decimal", "aria-describedby": "max-cost-help" });
  let lastEstimate = null;
  // On the researcher's own RunPod endpoint: the GPU pools that hold the chosen model (the
  // spec's runpod_gpu); "" lets the endpoint offer RunPod every fitting pool within the price band.
  const runpodGpu = el("select", { id: "runpod-gpu", name: "runpod_gpu", "aria-describedby": "runpod-gpu-help" });
  const runpodGpuField = compute.backend === "runpod"
    ? el("div", { class: "field" },
      el("label", { for: "runpod-gpu" }, "RunPod GPU"), runpodGpu,
      el("p", { class: "help", id: "runpod-gpu-help" },
        "Only the GPU types that hold this model are listed. Automatic offers RunPod the fitting ones " +
        "within the price band (more chances of a free GPU); one type bills at its price only."))
    : null;
  const form = el("form", { id: "new-experiment", novalidate: true },
    el("section", { class: "card" }, el("h2", {}, "Model"),
      el("label", { for: "model" }, "Model"), modelSelect, modelTable, runpodGpuField),
    el("section", { class: "card" }, el("h2", {}, "Data"),
      sampleButton(loadSample),
      el("p", {}, "Example files: ",
        EXAMPLE_FILES.map(([file, label], i) => [i ? " · " : "", el("a", { href: `/static/examples/${file}`, download: file }, label)])),
      fileField("train", (examples, format) => { data.train = examples; formats.train = format; changed(); }),
      fileField("eval", (examples, format) => { data.eval = examples; formats.eval = format; changed(); }),
      templateField()),
    el("section", { class: "card" }, el("h2", {}, "Data check"), dataReport),
    el("section", { class: "card" }, el("h2", {}, "Hyperparameters"),
      el("p", { class: "help", id: "presets-help" }, "Choosing a model fills in the hyperparameters it learns with."),
      el("div", { class: "grid" }, hyperparamFields.map(schemaNumberField), specNumberSpecs(schema).map(schemaNumberField),
        targetModulesField(schema))),
    el("section", { class: "card" }, el("h2", {}, "Influence"), methods, projectionField()),
    el("section", { class: "card" }, el("h2", {}, "Cost estimate"), estimate,
      el("label", { for: "max-cost" }, "Spend cap (USD, optional)"), spendCap,
      el("p", { class: "help", id: "max-cost-help" },
        "Refused when its estimate is over the cap; cancelled while it runs once its cost so far reaches it.")),
    el("div", { class: "actions" }, submit));

  function number(name) {
    return Number(form.elements[name].value);
  }

  function spec() {
    const hyperparams = {
      ...presetExtras,
      ...Object.fromEntries(hyperparamFields.map((h) => [h.name, number(h.name)])),
      target_modules: targetModules(form),
    };
    return {
      model_id: modelSelect.value,
      ...(data.train.datasetId ? { training_dataset_id: data.train.datasetId } : { training_data: withIds(data.train, "t") }),
      ...(data.eval.datasetId ? { eval_dataset_id: data.eval.datasetId } : { eval_data: withIds(data.eval, "e") }),
      hyperparams,
      few_shot_k: number("few_shot_k"),
      influence_method: form.elements[methodName].value,
      influence: {
        top_k: number("top_k"),
        ...(form.elements[PROJECTION_DIM.name].value ? { projection_dim: number(PROJECTION_DIM.name) } : {}),
      },
      template: form.elements.template.value,
      data_format: { training: formats.train, eval: formats.eval },
      ...(runpodGpuField && runpodGpu.value ? { runpod_gpu: runpodGpu.value } : {}),
    };
  }

  async function listRunpodGpus() {
    if (!runpodGpuField) return;
    const query = new URLSearchParams({ model_id: modelSelect.value, quantization: presetExtras.quantization || "none" });
    const { gpus } = await api("GET", `/api/models/runpod-gpus?${query}`);
    const kept = runpodGpu.value;
    runpodGpu.replaceChildren(
      el("option", { value: "" }, "Automatic (the fitting GPU types within the price band)"),
      ...gpus.map((gpu) => el("option", { value: gpu.pool },
        `${gpu.pool} — ${gpu.description}, ${gpu.memory_gb} GB, ${usd(gpu.usd_per_second * 3600)}/h`)),
      el("option", { value: "all-fitting" }, "Any GPU type that fits, whatever its price"));
    runpodGpu.value = [...runpodGpu.options].some((o) => o.value === kept) ? kept : "";
  }

  function fieldProblems() {
    return [...form.querySelectorAll("input[type=number], #hp-target_modules")]
      .filter((input) => !input.checkValidity())
      .map((input) => `${form.querySelector(`label[for="${input.id}"]`).textContent}: ${input.validationMessage}`);
  }

  async function refreshEstimate() {
    if (estimateAbort) estimateAbort.abort();
    estimateAbort = new AbortController();
    try {
      const answer = await api("POST", "/api/estimate", { body: spec(), signal: estimateAbort.signal });
      lastEstimate = answer;
      estimate.replaceChildren(...estimateView(answer));
      dataReport.replaceChildren(...dataReportView(answer.data_report));
    } catch (error) {
      if (error.name === "AbortError") return;
      estimate.replaceChildren(el("p", { class: "error" }, `No estimate: ${error.message}`));
      dataReport.replaceChildren(el("p", { class: "error" }, `No data check: ${error.message}`));
    }
  }

  function changed() {
    const ready = data.train && data.eval;
    const problems = fieldProblems();
    submit.disabled = !ready || problems.length > 0;
    clearTimeout(estimateTimer);
    // An estimate still on its way is for the form as it was: it must not overwrite this state.
    if (estimateAbort) estimateAbort.abort();
    if (!ready) return;
    if (problems.length) {
      estimate.replaceChildren(el("p", { class: "error" }, problems.join("; ")));
      return;
    }
    estimate.replaceChildren(el("p", { class: "help" }, "Estimating…"));
    estimateTimer = setTimeout(refreshEstimate, ESTIMATE_DELAY_MS);
  }

  function useModelPresets() {
    const model = models.find((m) => m.id === modelSelect.value);
    presetExtras = applyPresets(form, model ? model.presets : {});
  }

  function loadSample(sample) {
    if (models.some((m) => m.id === sample.model_id)) modelSelect.value = sample.model_id;
    modelSelect.dispatchEvent(new Event("change"));
    presetExtras = { ...presetExtras, ...applyPresets(form, sample.hyperparams) };
    form.elements.few_shot_k.value = sample.few_shot_k;
    form.elements.top_k.value = sample.influence.top_k;
    const method = form.querySelector(`input[name="${methodName}"][value="${sample.influence_method}"]`);
    if (method) method.checked = true;
    for (const kind of ["train", "eval"]) {
      data[kind] = kind === "train" ? sample.training_data : sample.eval_data;
      formats[kind] = null; // the gateway reads the shape of the examples
      document.getElementById(`file-${kind}-summary`).textContent =
        `Sample experiment: ${data[kind].length} ${KINDS[kind].label} examples.`;
      document.getElementById(`file-${kind}-errors`).replaceChildren();
    }
    announce("Loaded the sample experiment");
    changed();
  }

  modelSelect.addEventListener("change", () => { useModelPresets(); listRunpodGpus().then(changed); });
  useModelPresets();
  await listRunpodGpus();

  // The spend cap changes no estimate.
  form.addEventListener("input", (event) => { if (event.target.type !== "file" && event.target !== spendCap) changed(); });
  form.addEventListener("change", (event) => {
    if (event.target.type === "radio" || event.target === runpodGpu || event.target.name === "template") changed();
  });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const problems = fieldProblems();
    if (problems.length) return announce(problems.join("; "), "error");
    // RunPod stops a job at the endpoint's execution timeout and bills the time run until then.
    const overTimeout = (lastEstimate?.estimates || [])
      .filter((e) => e.backend === lastEstimate.active_backend)
      .flatMap((e) => e.notes).find((note) => note.startsWith("Over the execution timeout"));
    if (overTimeout && !window.confirm(`${overTimeout}\n\nStart it anyway?`)) {
      return announce("Not submitted: the estimate is over the execution timeout", "error");
    }
    submit.disabled = true;
    const body = spec();
    const cap = spendCap.value ? `?max_cost_usd=${encodeURIComponent(spendCap.value)}` : "";
    try {
      const answer = await api("POST", `/api/train${cap}`, { body, headers: { "Idempotency-Key": idempotencyKey } });
      idempotencyKey = crypto.randomUUID();
      announce("Experiment submitted");
      window.location.hash = `#/jobs/${encodeURIComponent(answer.job_id)}`;
    } catch (error) {
      submit.disabled = false;
      announce(`Not submitted: ${error.message}`, "error");
    }
  });

  view.append(el("h1", {}, "New experiment"), form);
  if (fromJob && fromCuration) {
    const parent = `/api/jobs/${encodeURIComponent(fromJob)}`;
    const [parentSpec, curated] = await Promise.all([
      api("GET", `${parent}/spec`),
      apiBlob(`${parent}/curations/${encodeURIComponent(fromCuration)}/training-set.jsonl`).then((blob) => blob.text())]);
    const training = curated.split("\n").filter((line) => line.trim()).map((line) => JSON.parse(line));
    loadSample({ ...parentSpec, training_data: training });
    announce(`Loaded the curated training set (${training.length} examples) of experiment ${fromJob.slice(0, 8)}`);
  }
  return () => {
    clearTimeout(estimateTimer);
    if (estimateAbort) estimateAbort.abort();
  };
}
