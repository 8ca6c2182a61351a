// Settings -> Compute: hosted vs bring-your-own RunPod key, key save & verify (only the last 4
// characters are ever shown back), the endpoint as RunPod reports it (id, GPU pools, workers,
// console link, delete), cost per experiment, key removal (from any backend).

import { api, ApiError } from "../api.js";
import { announce, BACKEND_NAMES, dateTime, duration, el, usd } from "../ui.js";
import { trackingCard } from "./tracking.js";

const REFRESH_WHILE_CREATING_MS = 3000;
const CONSOLE_SERVERLESS_URL = "https://console.runpod.io/serverless";
const WORKER_STATES = ["running", "idle", "initializing", "throttled", "unhealthy"];

function keyErrorText(error) {
  if (!(error instanceof ApiError)) return error.message;
  if (error.status === 400) return `Invalid API key: ${error.message}. Check that you copied the whole key.`;
  if (error.status === 402) return `Key has no funds: ${error.message}`;
  if (error.status === 403) return `The key lacks a permission: ${error.message}. Create a key with full access.`;
  return error.message;
}

function statusStep(id, label, state, detail) {
  const marks = { done: "✓", pending: "○", error: "✗", working: "…" };
  return el("li", { id, class: `step ${state}`, "data-state": state },
    el("span", { class: "mark", "aria-hidden": "true" }, marks[state]),
    el("span", { class: "visually-hidden" }, `${state}: `),
    el("strong", {}, label), detail ? el("span", { class: "help" }, ` — ${detail}`) : null);
}

// One RunPod call the dashboard makes with the researcher's key; ``call`` is compute-runpod's name
// for it (compute_runpod/client.py), which tests/deploy checks this list against.
function keyUse(call, ...text) {
  return el("li", { "data-runpod-call": call }, ...text);
}

// The endpoint as RunPod reports it; RunPod (or a service) unreachable must not take the page down.
async function loadEndpoint() {
  try {
    return await api("GET", "/api/settings/runpod-endpoint");
  } catch (error) {
    return { state: "unreachable", byok_available: true, message: error.message, gpu_pools: [] };
  }
}

export async function renderSettings(view) {
  let info = await api("GET", "/api/settings/runpod-key");
  let endpoint = await loadEndpoint();
  let hfToken = await api("GET", "/api/settings/hf-token");
  let refreshTimer = null;

  const hostedRadio = el("input", { type: "radio", id: "backend-hosted", name: "backend", value: "hosted",
    "aria-describedby": "backend-hosted-help" });
  const runpodRadio = el("input", { type: "radio", id: "backend-runpod", name: "backend", value: "runpod",
    "aria-describedby": "backend-runpod-help" });
  const keyInput = el("input", { id: "runpod-key", name: "runpod-key", type: "password", autocomplete: "off",
    spellcheck: "false", autocapitalize: "off", "aria-describedby": "key-notice key-help" });
  const showToggle = el("button", { type: "button", id: "toggle-key", "aria-pressed": "false", "aria-controls": "runpod-key" }, "Show");
  const saveButton = el("button", { type: "submit", id: "save-key" }, "Save & Verify");
  const keyMessage = el("div", { id: "key-message", "aria-live": "polite" });
  const savedKey = el("p", { id: "saved-key" });
  const steps = el("ol", { id: "runpod-status", class: "steps", "aria-label": "RunPod status" });
  const removeButton = el("button", { type: "button", id: "remove-key", class: "danger" }, "Remove API key");
  const endpointCard = el("div", { id: "runpod-endpoint", "aria-live": "polite" });
  const byokUnavailable = el("p", { id: "byok-unavailable", class: "notice", role: "note" });
  const costs = el("div", { id: "cost-per-experiment", "aria-live": "polite" }, el("p", { class: "help" }, "Estimating…"));
  const hfInput = el("input", { id: "hf-token", name: "hf-token", type: "password", autocomplete: "off",
    spellcheck: "false", autocapitalize: "off", "aria-describedby": "hf-token-help" });
  const hfSaved = el("p", { id: "hf-token-status" });
  const hfRemove = el("button", { type: "button", id: "remove-hf-token", class: "danger" }, "Remove token");
  const hfForm = el("form", { id: "hf-token-form", autocomplete: "off" },
    el("label", { for: "hf-token" }, "Hugging Face access token"),
    el("div", { class: "inline" }, hfInput, el("button", { type: "submit", id: "save-hf-token" }, "Save token")),
    el("p", { id: "hf-token-help", class: "help" },
      "Gated models (Llama, Gemma) download only with a token of an account that accepted their licence on huggingface.co. " +
      "Create a read token there and paste it here: it is stored encrypted, only its last 4 characters are shown, " +
      "and it goes to your own jobs' workers on RunPod and Modal, nowhere else."));

  const keyForm = el("form", { id: "runpod-key-form", autocomplete: "off" },
    el("label", { for: "runpod-key" }, "RunPod API key"),
    el("div", { class: "inline" }, keyInput, showToggle, saveButton),
    el("p", { id: "key-help", class: "help" }, "We check the key with RunPod (valid key, funds) before storing it encrypted."),
    keyMessage);

  const runpodPanel = el("div", { id: "runpod-panel", class: "panel" },
    info.runpod_simulated ? el("p", { id: "runpod-simulated", class: "notice", role: "note" },
      el("strong", {}, "This RunPod is simulated. "),
      "The dashboard talks to devstack's fake RunPod (DEVSTACK_FAKE_RUNPOD=1): no real GPU, no real money; " +
      "jobs run on this machine under RunPod's own worker code. Use the test key that make run printed.") : null,
    el("div", { id: "key-notice", class: "notice" },
      el("p", {},
        el("strong", {}, "Your RunPod API key gives full access to your RunPod account. "),
        "It is stored encrypted and never shown again in full. These are the RunPod calls the dashboard makes with it, and the only ones:"),
      el("ul", { id: "key-uses" },
        keyUse("graphql", "reads your account id and balance (GraphQL ", el("code", {}, "myself"), "), when you save the key and before each job"),
        keyUse("serverless.list", "lists your serverless endpoints, to find the one it created"),
        keyUse("templates.get", "reads the operator's worker template, to keep your endpoint on the current worker"),
        keyUse("serverless.create", "creates one serverless endpoint on your account, on first use"),
        keyUse("serverless.get", "reads that endpoint (its GPU pools and template)"),
        keyUse("serverless.update", "updates that endpoint's template, or its GPU pools to fit the next job's model"),
        keyUse("job.health", "reads that endpoint's job counts, to change its GPU pools only when none of your jobs is on it"),
        keyUse("serverless.workers", "reads that endpoint's workers, to tell you when a job waits for a GPU"),
        keyUse("serverless.delete", "deletes that endpoint, only when you press “Delete endpoint” or remove the key and ask for it"),
        keyUse("job.run", "submits each experiment you start to that endpoint"),
        keyUse("job.status", "reads each job's status and result"),
        keyUse("job.stream", "reads each job's progress"),
        keyUse("job.cancel", "cancels a job when you cancel or delete it")),
      el("p", {}, "You can see, rotate or revoke the key on ",
        el("a", { id: "runpod-key-page", href: "https://console.runpod.io/user/credentials", target: "_blank", rel: "noopener noreferrer" },
          "RunPod's API keys page"), ".")),
    el("div", { class: "signup" },
      el("h3", {}, "No RunPod account yet?"),
      el("ol", {},
        el("li", {}, "Sign up at ", el("a", { href: "https://runpod.io", target: "_blank", rel: "noopener noreferrer" }, "runpod.io"), " and add credits under Billing."),
        el("li", {}, "Open Settings → API Keys → Create API Key, with full access (the key must create an endpoint)."),
        el("li", {}, "Copy the key, paste it below and press “Save & Verify”."))),
    keyForm,
    steps,
    endpointCard);

  view.append(
    el("h1", {}, "Settings"),
    el("section", { class: "card", "aria-labelledby": "compute-heading" },
      el("h2", { id: "compute-heading" }, "Compute"),
      el("fieldset", {},
        el("legend", {}, "Where your experiments run"),
        el("div", { class: "radio" }, hostedRadio, el("label", { for: "backend-hosted" }, "Hosted (free tier)"),
          el("span", { id: "backend-hosted-help", class: "help" }, " — GPUs run by this dashboard's operator; nothing to set up.")),
        el("div", { class: "radio" }, runpodRadio, el("label", { for: "backend-runpod" }, "Bring your own GPU (RunPod)"),
          el("span", { id: "backend-runpod-help", class: "help" }, " — runs on your RunPod account, billed per second by RunPod.")),
        byokUnavailable),
      runpodPanel,
      // Outside the RunPod panel: a stored key can be removed whichever backend is chosen.
      savedKey,
      el("div", { class: "actions" }, removeButton)),
    el("section", { class: "card", "aria-labelledby": "hf-heading" },
      el("h2", { id: "hf-heading" }, "Hugging Face token"), hfSaved, hfForm, el("div", { class: "actions" }, hfRemove)),
    el("section", { class: "card", "aria-labelledby": "cost-heading" },
      el("h2", { id: "cost-heading" }, "Estimated cost per experiment"),
      costs),
    await trackingCard());

  function endpointDetails() {
    if (endpoint.state === "live") {
      const workers = endpoint.workers || {};
      const counts = WORKER_STATES.filter((name) => workers[name]).map((name) => `${workers[name]} ${name}`);
      return [
        el("h3", {}, "Your RunPod endpoint"),
        el("dl", { class: "facts", id: "endpoint-facts" },
          el("dt", {}, "Endpoint id"), el("dd", { id: "endpoint-id" }, el("code", {}, endpoint.endpoint_id)),
          el("dt", {}, "GPU pools"), el("dd", { id: "endpoint-pools" }, endpoint.gpu_pools.join(", ") || "—"),
          el("dt", {}, "Workers"), el("dd", { id: "endpoint-workers" },
            `${counts.length ? counts.join(", ") : "none running (idle endpoints cost nothing)"}; at most ${endpoint.workers_max}`),
          el("dt", {}, "Execution timeout"), el("dd", {}, duration(endpoint.execution_timeout_s))),
        el("p", {},
          el("a", { id: "endpoint-console", href: endpoint.console_url, target: "_blank", rel: "noopener noreferrer" },
            "Open it in RunPod's console"),
          ". It stays on your account until you delete it; deleting stops its workers and cancels whatever still runs there."),
        el("div", { class: "actions" },
          el("button", { type: "button", id: "delete-endpoint", class: "danger", onclick: deleteEndpoint }, "Delete endpoint")),
      ];
    }
    if (endpoint.state === "gone") {
      return el("p", { class: "help", id: "endpoint-gone" },
        `Your endpoint ${endpoint.endpoint_id} was deleted outside the dashboard; the next experiment on RunPod creates a new one.`);
    }
    if (endpoint.state === "unreachable") {
      return el("p", { class: "error", id: "endpoint-unreachable" }, `Your endpoint could not be read: ${endpoint.message}`);
    }
    if (endpoint.state === "unknown") {
      return el("p", { class: "help", id: "endpoint-unknown" },
        `Endpoint ${endpoint.endpoint_id} may still be on your RunPod account; without a key the dashboard cannot see or delete it. `,
        el("a", { href: CONSOLE_SERVERLESS_URL, target: "_blank", rel: "noopener noreferrer" }, "Delete it in RunPod's console"), ".");
    }
    return null;
  }

  function show() {
    const runpodChosen = runpodRadio.checked;
    // BYOK is offered only where the server can run it; a stored key stays removable.
    runpodRadio.disabled = !endpoint.byok_available && !info.has_key && !runpodChosen;
    byokUnavailable.hidden = endpoint.byok_available;
    byokUnavailable.textContent = endpoint.byok_available ? "" : `Not available here: ${endpoint.unavailable_reason}.`;
    runpodPanel.hidden = !runpodChosen;
    removeButton.hidden = !info.has_key;
    savedKey.textContent = info.has_key
      ? `Saved RunPod key ending in ${info.last4}${info.verified_at ? `, verified ${dateTime(info.verified_at)}` : ""}.`
      : "No key saved.";
    // The steps follow what RunPod reports now, not what was once stored.
    const endpointState = info.endpoint_status;
    const live = endpoint.state === "live";
    const endpointStep = live
      ? statusStep("step-endpoint", "Endpoint created", "done", endpoint.endpoint_id)
      : endpointState === "creating"
        ? statusStep("step-endpoint", "Endpoint created", "working", "creating it on your account")
        : statusStep("step-endpoint", "Endpoint created", "pending", "created on your first experiment");
    const readyStep = info.has_key && live && endpointState === "ready"
      ? statusStep("step-ready", "Ready to use", "done", "experiments run on your RunPod account")
      : endpointState === "error" && info.has_key
        ? statusStep("step-ready", "Ready to use", "error", info.endpoint_error || "the endpoint could not be set up")
        : statusStep("step-ready", "Ready to use", "pending", "");
    steps.replaceChildren(
      statusStep("step-key", "Key saved", info.has_key ? "done" : "pending", info.has_key ? `ending in ${info.last4}` : ""),
      endpointStep, readyStep);
    endpointCard.replaceChildren(...[endpointDetails()].flat().filter(Boolean));
    clearTimeout(refreshTimer);
    if (endpointState === "creating") refreshTimer = setTimeout(reload, REFRESH_WHILE_CREATING_MS);
  }

  async function reload() {
    info = await api("GET", "/api/settings/runpod-key");
    endpoint = await loadEndpoint();
    hostedRadio.checked = info.backend !== "runpod";
    runpodRadio.checked = info.backend === "runpod" || (runpodRadio.checked && !info.has_key);
    show();
  }

  // A 409 naming jobs still running on RunPod: offer to cancel them and go on.
  async function withRunningJobs(method, path, what) {
    try {
      return await api(method, path);
    } catch (error) {
      if (!(error instanceof ApiError) || error.status !== 409 || !error.message.includes("cancel_jobs")) throw error;
      if (!window.confirm(`${error.message}\n\nCancel those jobs and ${what}?`)) throw error;
      return api(method, `${path}${path.includes("?") ? "&" : "?"}cancel_jobs=true`);
    }
  }

  async function deleteEndpoint() {
    if (!window.confirm(`Delete your RunPod endpoint ${endpoint.endpoint_id}? RunPod stops its workers and cancels any job still on it; the next experiment on RunPod creates a new one.`)) return;
    try {
      await withRunningJobs("DELETE", "/api/settings/runpod-endpoint", "delete the endpoint");
      await reload();
      announce("RunPod endpoint deleted");
    } catch (error) {
      announce(`Not deleted: ${error.message}`, "error");
    }
  }

  async function chooseBackend(backend) {
    if (backend === "runpod" && !info.has_key) {
      show();
      keyInput.focus();
      announce("Save a RunPod API key to switch to your own GPU");
      return;
    }
    try {
      await api("PUT", "/api/settings/compute", { body: { backend } });
      announce(`Experiments now run on: ${BACKEND_NAMES[backend]}`);
      await reload();
      await loadCosts();
    } catch (error) {
      announce(`Not changed: ${error.message}`, "error");
      await reload();
    }
  }

  hostedRadio.addEventListener("change", () => chooseBackend("hosted"));
  runpodRadio.addEventListener("change", () => chooseBackend("runpod"));

  showToggle.addEventListener("click", () => {
    const showing = keyInput.type === "text";
    keyInput.type = showing ? "password" : "text";
    showToggle.textContent = showing ? "Show" : "Hide";
    showToggle.setAttribute("aria-pressed", String(!showing));
  });

  keyForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    const apiKey = keyInput.value.trim();
    if (!apiKey) {
      keyMessage.replaceChildren(el("p", { class: "error" }, "Paste your RunPod API key first."));
      return;
    }
    // The full key leaves the page at once, whatever the outcome.
    keyInput.value = "";
    keyInput.type = "password";
    showToggle.textContent = "Show";
    showToggle.setAttribute("aria-pressed", "false");
    saveButton.disabled = true;
    keyMessage.replaceChildren(el("p", { class: "help" }, "Checking the key with RunPod…"));
    try {
      const saved = await api("POST", "/api/settings/runpod-key", { body: { api_key: apiKey } });
      await reload();
      keyMessage.replaceChildren(el("p", { class: "ok", id: "key-saved" },
        `Key saved: ending in ${saved.last4}. Experiments now run on your RunPod account` +
        (saved.balance_usd ? ` (balance ${usd(saved.balance_usd, 2)}).` : ".")));
      if (saved.balance_usd === null && saved.message) {
        // RunPod could not tell the balance (its GraphQL API): say so, and what still bounds spend.
        keyMessage.append(el("p", { class: "help", id: "key-balance-note" }, saved.message));
      }
      announce(`RunPod key ending in ${saved.last4} saved`);
      await loadCosts();
    } catch (error) {
      keyMessage.replaceChildren(el("p", { class: "error", id: "key-error", role: "alert" }, keyErrorText(error)));
    } finally {
      saveButton.disabled = false;
    }
  });

  removeButton.addEventListener("click", async () => {
    if (!window.confirm("Remove your RunPod API key and go back to the hosted backend?")) return;
    // The endpoint outlives the key unless deleted now, while the key can still reach it.
    const alsoEndpoint = endpoint.state === "live" && window.confirm(
      `Also delete your RunPod endpoint ${endpoint.endpoint_id}? Press Cancel to keep it on your RunPod account (idle, not billed).`);
    try {
      await withRunningJobs("DELETE", `/api/settings/runpod-key${alsoEndpoint ? "?delete_endpoint=true" : ""}`, "remove the key");
      runpodRadio.checked = false;
      await reload();
      keyMessage.replaceChildren();
      announce(`RunPod key removed${alsoEndpoint ? " and endpoint deleted" : ""}; experiments run on the hosted backend`);
      await loadCosts();
    } catch (error) {
      announce(`Not removed: ${error.message}`, "error");
    }
  });

  function showHfToken() {
    hfSaved.textContent = hfToken.has_token
      ? `Saved token ending in ${hfToken.last4}${hfToken.updated_at ? `, saved ${dateTime(hfToken.updated_at)}` : ""}.`
      : "No token saved.";
    hfRemove.hidden = !hfToken.has_token;
  }

  hfForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    const token = hfInput.value.trim();
    hfInput.value = "";  // the full token leaves the page at once, whatever the outcome
    if (!token) return announce("Paste your Hugging Face token first", "error");
    try {
      hfToken = await api("PUT", "/api/settings/hf-token", { body: { token } });
      showHfToken();
      announce(`Hugging Face token ending in ${hfToken.last4} saved`);
    } catch (error) {
      announce(`Not saved: ${error.message}`, "error");
    }
  });

  hfRemove.addEventListener("click", async () => {
    if (!window.confirm("Remove your Hugging Face token? Jobs on gated models will be refused until you add one.")) return;
    try {
      await api("DELETE", "/api/settings/hf-token");
      hfToken = await api("GET", "/api/settings/hf-token");
      showHfToken();
      announce("Hugging Face token removed");
    } catch (error) {
      announce(`Not removed: ${error.message}`, "error");
    }
  });

  async function loadCosts() {
    try {
      const sample = await (await fetch("/static/examples/sample.json")).json();
      const answer = await api("POST", "/api/estimate", { body: sample });
      costs.replaceChildren(
        el("p", { class: "help" }, `For the sample experiment (${sample.training_data.length} training and ${sample.eval_data.length} eval examples, ${sample.hyperparams.epochs} epochs on ${sample.model_id}):`),
        el("table", { class: "data compact", id: "cost-table" },
          el("thead", {}, el("tr", {}, ...["Backend", "GPU", "Time", "Price", "Per experiment"].map((h) => el("th", { scope: "col" }, h)))),
          el("tbody", {}, answer.estimates.map((e) => el("tr", { class: e.backend === answer.active_backend ? "" : "inactive" },
            el("th", { scope: "row" }, `${BACKEND_NAMES[e.backend] || e.backend}${e.backend === answer.active_backend ? " (active)" : ""}`),
            el("td", {}, e.gpu), el("td", { class: "num" }, duration(e.estimated_time_s)),
            el("td", { class: "num" }, `${usd(e.usd_per_second, 5)}/s`),
            el("td", { class: "num" }, usd(e.estimated_cost_usd)))))),
        el("p", { class: "help" }, "RunPod bills per second of GPU time, cold start included; prices as of ",
          answer.estimates.map((e) => `${e.prices_as_of} (${e.backend})`).join(", "), "."));
    } catch (error) {
      costs.replaceChildren(el("p", { class: "error" }, `No estimate: ${error.message}`));
    }
  }

  hostedRadio.checked = info.backend !== "runpod";
  runpodRadio.checked = info.backend === "runpod";
  show();
  showHfToken();
  loadCosts();
  return () => clearTimeout(refreshTimer);
}
