// Settings -> Experiment tracking: your own MLflow (URI, experiment, optional token) and W&B
// (project, entity, API key). Secrets go to the key vault and are shown by their last 4 only;
// each completed experiment is logged there (params, loss per step, metrics, links to its files).

import { api } from "../api.js";
import { announce, el } from "../ui.js";

function field(id, label, attrs = {}) {
  const input = el("input", { id, name: id, autocomplete: "off", spellcheck: "false", ...attrs });
  return [input, el("div", { class: "field" }, el("label", { for: id }, label), input)];
}

const TRACKER_NAMES = { mlflow: "MLflow", wandb: "W&B" };

// A job page's "Tracked in": each tracker's run (a link where it has a URL) or why it is not there.
export function trackingFacts(tracking) {
  const status = tracking && tracking.status;
  if (!status || status === "none") return document.createTextNode("—");
  const trackers = Object.entries(tracking.trackers || {});
  if (!trackers.length) return document.createTextNode(status === "pending" || status === "exporting" ? "being logged…" : status);
  return el("span", {}, trackers.map(([name, entry], index) => [
    index ? "; " : "",
    entry.status === "exported"
      ? (entry.url ? el("a", { href: entry.url, target: "_blank", rel: "noopener noreferrer" }, TRACKER_NAMES[name] || name)
        : `${TRACKER_NAMES[name] || name} (${entry.run_id || "logged"})`)
      : `${TRACKER_NAMES[name] || name}: ${status === "failed" ? "failed" : "will retry"} — ${entry.error || entry.status}`,
  ]));
}

export async function trackingCard() {
  let info = await api("GET", "/api/settings/tracking");
  const message = el("div", { id: "tracking-message", "aria-live": "polite" });
  const operator = el("p", { id: "tracking-operator", class: "help" });

  const [mlflowUri, mlflowUriField] = field("mlflow-uri", "MLflow tracking URI", { type: "url", placeholder: "https://mlflow.example.org" });
  const [mlflowExperiment, mlflowExperimentField] = field("mlflow-experiment", "Experiment name (optional)");
  const [mlflowToken, mlflowTokenField] = field("mlflow-token", "Token (optional, sent as Bearer)", { type: "password" });
  const mlflowSaved = el("p", { id: "mlflow-saved", class: "help" });
  const mlflowRemove = el("button", { type: "button", id: "remove-mlflow", class: "danger" }, "Remove MLflow");
  const mlflowForm = el("form", { id: "mlflow-form", autocomplete: "off" },
    el("h3", {}, "MLflow"), mlflowUriField, mlflowExperimentField, mlflowTokenField,
    el("div", { class: "actions" }, el("button", { type: "submit", id: "save-mlflow" }, "Save MLflow"), mlflowRemove),
    mlflowSaved);

  const [wandbProject, wandbProjectField] = field("wandb-project", "W&B project");
  const [wandbEntity, wandbEntityField] = field("wandb-entity", "Entity (team or user, optional)");
  const [wandbKey, wandbKeyField] = field("wandb-key", "W&B API key", { type: "password" });
  const wandbSaved = el("p", { id: "wandb-saved", class: "help" });
  const wandbRemove = el("button", { type: "button", id: "remove-wandb", class: "danger" }, "Remove W&B");
  const wandbForm = el("form", { id: "wandb-form", autocomplete: "off" },
    el("h3", {}, "Weights & Biases"), wandbProjectField, wandbEntityField, wandbKeyField,
    el("div", { class: "actions" }, el("button", { type: "submit", id: "save-wandb" }, "Save W&B"), wandbRemove),
    wandbSaved);

  function show() {
    mlflowUri.value = info.mlflow.tracking_uri || "";
    mlflowExperiment.value = info.mlflow.experiment_name || "";
    mlflowSaved.textContent = info.mlflow.tracking_uri
      ? `Logging to ${info.mlflow.tracking_uri}` + (info.mlflow.has_token ? ` with the token ending in ${info.mlflow.token_last4}.` : " (no token).")
      : "Not set.";
    mlflowRemove.hidden = !info.mlflow.tracking_uri && !info.mlflow.has_token;
    wandbProject.value = info.wandb.project || "";
    wandbEntity.value = info.wandb.entity || "";
    wandbSaved.textContent = info.wandb.project
      ? `Logging to ${info.wandb.entity ? `${info.wandb.entity}/` : ""}${info.wandb.project}` + (info.wandb.has_key ? ` with the key ending in ${info.wandb.key_last4}.` : ".")
      : "Not set.";
    wandbRemove.hidden = !info.wandb.project && !info.wandb.has_key;
    const theirs = [info.operator_mlflow ? "MLflow" : null, info.operator_wandb ? "W&B" : null].filter(Boolean);
    operator.textContent = theirs.length
      ? `Where you set none of your own, this dashboard's operator logs your experiments to their ${theirs.join(" and ")}.`
      : "This dashboard's operator logs experiments nowhere; set your own tracker below.";
  }

  async function send(method, path, body, done) {
    try {
      info = await api(method, path, body ? { body } : {});
      show();
      message.replaceChildren(el("p", { class: "ok" }, done));
      announce(done);
    } catch (error) {
      message.replaceChildren(el("p", { class: "error", role: "alert" }, error.message));
    }
  }

  mlflowForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = { tracking_uri: mlflowUri.value.trim(), experiment_name: mlflowExperiment.value.trim() };
    if (mlflowToken.value.trim()) body.token = mlflowToken.value.trim();
    mlflowToken.value = "";  // the secret leaves the page at once
    await send("PUT", "/api/settings/tracking/mlflow", body, "MLflow saved: new experiments are logged there");
  });
  wandbForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = { project: wandbProject.value.trim(), entity: wandbEntity.value.trim() };
    if (wandbKey.value.trim()) body.api_key = wandbKey.value.trim();
    wandbKey.value = "";
    await send("PUT", "/api/settings/tracking/wandb", body, "W&B saved: new experiments are logged there");
  });
  mlflowRemove.addEventListener("click", () => send("DELETE", "/api/settings/tracking/mlflow", null, "MLflow removed"));
  wandbRemove.addEventListener("click", () => send("DELETE", "/api/settings/tracking/wandb", null, "W&B removed"));

  show();
  return el("section", { class: "card", id: "tracking", "aria-labelledby": "tracking-heading" },
    el("h2", { id: "tracking-heading" }, "Experiment tracking"),
    el("p", { class: "help" }, "Each completed experiment is logged with its parameters, loss per step, evaluation metrics and links to its files."),
    operator, mlflowForm, wandbForm, message);
}
