// Small DOM and formatting helpers shared by the pages.

// el("p", {class: "x", onclick: fn}, "text", child, ...): text children are never parsed as HTML.
export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") {
      node.addEventListener(name.slice(2), value);
    } else if (name === "class") {
      node.className = value;
    } else if (value === true) {
      node.setAttribute(name, "");
    } else {
      node.setAttribute(name, String(value));
    }
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

let nextId = 0;
export function uid(prefix) {
  nextId += 1;
  return `${prefix}-${nextId}`;
}

// Screen readers hear this region (aria-live="polite" in index.html).
export function announce(text, kind = "info") {
  const region = document.getElementById("status");
  region.textContent = text;
  region.dataset.kind = kind;
}

export function usd(value, digits = 4) {
  if (value === null || value === undefined || Number.isNaN(value)) return "—";
  if (value === 0) return "$0 (free)";
  if (value < 0.0001) return `$${value.toExponential(2)}`;
  return `$${value.toFixed(digits)}`;
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return "—";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

export function dateTime(iso) {
  if (!iso) return "—";
  const when = new Date(iso);
  return Number.isNaN(when.getTime()) ? iso : when.toLocaleString();
}

// Saves ``content`` (text or a Blob) as a file through a temporary link.
export function download(filename, content, type) {
  const blob = content instanceof Blob ? content : new Blob([content], { type });
  const url = URL.createObjectURL(blob);
  const link = el("a", { href: url, download: filename });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

let plotlyLoading = null;
// Plotly (4.8 MB) loads only on the pages that draw charts; the gateway serves it locally.
export function loadPlotly() {
  if (window.Plotly) return Promise.resolve(window.Plotly);
  if (!plotlyLoading) {
    plotlyLoading = new Promise((resolve, reject) => {
      const script = el("script", { src: "/static/vendor/plotly.min.js" });
      script.addEventListener("load", () => resolve(window.Plotly));
      script.addEventListener("error", () => reject(new Error("The chart library failed to load")));
      document.head.append(script);
    });
  }
  return plotlyLoading;
}

// Training loss by step into `host`, one line per series ({name, points: [{step, loss}]}): one
// run's curve on its job page, several overlaid on the compare page.
export async function plotLossCurves(host, series) {
  const Plotly = await loadPlotly();
  if (!host.isConnected) return;
  if (!host.querySelector(".plot-container")) host.replaceChildren();
  Plotly.react(host, series.map(({ name, points }) => ({
    x: points.map((p) => p.step), y: points.map((p) => p.loss), mode: "lines+markers", name,
  })), {
    margin: { t: 10, r: 10, b: 40, l: 50 }, height: 260, showlegend: series.length > 1,
    xaxis: { title: { text: "step" } }, yaxis: { title: { text: "loss" } },
  }, { displaylogo: false, responsive: true });
}

export function bytes(count) {
  if (count === null || count === undefined || Number.isNaN(count)) return "—";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let value = count;
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit += 1;
  }
  return unit === 0 ? `${value} B` : `${value.toFixed(value < 10 ? 2 : 1)} ${units[unit]}`;
}

export const BACKEND_NAMES = { hosted: "Hosted (free tier)", runpod: "Your RunPod account" };
