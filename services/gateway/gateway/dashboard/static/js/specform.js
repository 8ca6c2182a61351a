// The New experiment page's spec fields, built from the gateway's GET /api/config (the spec's JSON
// Schema: defaults and bounds; the limits; the influence methods) rather than copied, plus the
// model presets and the sample experiment.

import { el } from "./ui.js";

// Which schema property each field edits, and its label; bounds and defaults come from the schema.
const HYPERPARAM_FIELDS = [
  ["epochs", "Epochs"],
  ["learning_rate", "Learning rate"],
  ["batch_size", "Batch size"],
  ["lora_r", "LoRA rank (r)"],
  ["lora_alpha", "LoRA alpha"],
  ["max_seq_len", "Max sequence length (tokens)"],
  ["max_new_tokens", "Max new tokens per answer"],
  ["seed", "Random seed"],
];
const SPEC_FIELDS = [
  ["ExperimentSpec", "few_shot_k", "Few-shot demonstrations"],
  ["InfluenceOptions", "top_k", "Top influential examples to keep"],
];
export const SAMPLE_URL = "/static/examples/sample.json";

function definition(schema, name) {
  return name === "ExperimentSpec" ? schema : schema.$defs[name];
}

// {name, label, value, min, max, exclusiveMin, step, integer} of one property of the schema.
function numberSpec(schema, defName, name, label) {
  const property = definition(schema, defName).properties[name];
  const integer = property.type === "integer";
  return {
    name, label, integer,
    value: property.default,
    min: property.minimum ?? property.exclusiveMinimum,
    max: property.maximum ?? property.exclusiveMaximum,
    exclusiveMin: property.exclusiveMinimum,
    exclusiveMax: property.exclusiveMaximum,
    step: integer ? 1 : "any",
  };
}

export function hyperparamSpecs(schema) {
  return HYPERPARAM_FIELDS.map(([name, label]) => numberSpec(schema, "Hyperparams", name, label));
}

export function specNumberSpecs(schema) {
  return SPEC_FIELDS.map(([defName, name, label]) => numberSpec(schema, defName, name, label));
}

// A number input whose validity follows the schema, including the exclusive bounds that HTML's
// min/max cannot say (a learning rate must be greater than 0, not 0 itself).
export function schemaNumberField(field) {
  const id = `hp-${field.name}`;
  const input = el("input", {
    id, name: field.name, type: "number", value: field.value, min: field.min, max: field.max,
    step: field.step, required: true, inputmode: field.integer ? "numeric" : "decimal",
    "data-exclusive-min": field.exclusiveMin, "data-exclusive-max": field.exclusiveMax,
  });
  const check = () => {
    const value = Number(input.value);
    let message = "";
    if (input.value !== "" && field.exclusiveMin !== undefined && value <= field.exclusiveMin) {
      message = `Must be greater than ${field.exclusiveMin}.`;
    } else if (input.value !== "" && field.exclusiveMax !== undefined && value >= field.exclusiveMax) {
      message = `Must be less than ${field.exclusiveMax}.`;
    }
    input.setCustomValidity(message);
  };
  input.addEventListener("input", check);
  input.addEventListener("change", check);
  check();
  return el("div", { class: "field" }, el("label", { for: id }, field.label), input);
}

// The LoRA target modules as a comma-separated text field (the schema needs at least one).
export function targetModulesField(schema) {
  const property = schema.$defs.Hyperparams.properties.target_modules;
  const input = el("input", { id: "hp-target_modules", name: "target_modules", type: "text", required: true,
    value: (property.default || []).join(", "), "aria-describedby": "hp-target_modules-help" });
  return el("div", { class: "field" },
    el("label", { for: "hp-target_modules" }, "LoRA target modules"), input,
    el("p", { class: "help", id: "hp-target_modules-help" }, "Comma-separated module names, e.g. q_proj, v_proj."));
}

export function targetModules(form) {
  return form.elements.target_modules.value.split(",").map((name) => name.trim()).filter(Boolean);
}

// Fill the hyperparameter inputs from a model's presets; answers the presets the page has no
// input for (e.g. quantization), which the spec then carries as they are.
export function applyPresets(form, presets) {
  const hidden = {};
  for (const [name, value] of Object.entries(presets || {})) {
    const input = form.elements[name];
    if (name === "target_modules" && input) input.value = value.join(", ");
    else if (input && input.type === "number") input.value = value;
    else hidden[name] = value;
    if (input) input.dispatchEvent(new Event("change"));
  }
  return hidden;
}

// The button that loads examples/sample.json into the form: data, model, hyperparameters, method.
export function sampleButton(onLoaded) {
  const button = el("button", { type: "button", id: "load-sample" }, "Load the sample experiment");
  const note = el("p", { class: "help", id: "load-sample-help" },
    "26 color and animal-sound questions, two of them with wrong answers, on the built-in tiny model: "
    + "its presets learn them in about a minute and influence finds the mislabelled ones.");
  button.addEventListener("click", async () => {
    button.disabled = true;
    try {
      const response = await fetch(SAMPLE_URL);
      if (!response.ok) throw new Error(`${SAMPLE_URL} answered ${response.status}`);
      onLoaded(await response.json());
    } finally {
      button.disabled = false;
    }
  });
  return el("div", { class: "sample" }, button, note);
}
