// The hash router: #/signin, #/jobs (filters after "?"), #/new, #/new/<job>/<curation> (a curated
// training set), #/jobs/<id>, #/compare/<id>,<id>, #/settings.

import { setToken, token } from "./api.js";
import { announce } from "./ui.js";
import { renderSignIn } from "./pages/signin.js";
import { renderJobs } from "./pages/jobs.js";
import { renderNewExperiment } from "./pages/newjob.js";
import { renderJob } from "./pages/job.js";
import { renderCompare } from "./pages/compare.js";
import { renderSettings } from "./pages/settings.js";

const main = document.getElementById("main");
const nav = document.getElementById("nav");
let leaving = null;

function route() {
  const [hash, query = ""] = window.location.hash.replace(/^#\/?/, "").split("?");
  const [page, ...rest] = hash.split("/");
  return { page: page || "jobs", rest: rest.map(decodeURIComponent), query: new URLSearchParams(query) };
}

let renders = 0;

async function render() {
  // Each page may hand back a cleanup (e.g. closing its progress stream).
  if (leaving) leaving();
  leaving = null;
  renders += 1;
  const thisRender = renders;
  const { page, rest, query } = route();
  const signedIn = Boolean(token());
  nav.hidden = !signedIn;
  if (!signedIn && page !== "signin") {
    window.location.hash = "#/signin";
    return;
  }
  for (const link of nav.querySelectorAll("a[data-route]")) {
    if (link.dataset.route === page) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  // A fresh view per render: a page still loading when the user moves on fills a detached view.
  const view = document.createElement("div");
  main.replaceChildren(view);
  announce("");
  const pages = {
    signin: () => renderSignIn(view),
    jobs: () => (rest[0] ? renderJob(view, rest[0]) : renderJobs(view, query)),
    compare: () => renderCompare(view, (rest[0] || "").split(",").filter(Boolean)),
    new: () => renderNewExperiment(view, rest),
    settings: () => renderSettings(view),
  };
  const show = pages[page] || (() => renderJobs(view));
  let cleanup = null;
  try {
    cleanup = (await show()) || null;
  } catch (error) {
    if (thisRender === renders) announce(error.message, "error");
  }
  if (thisRender !== renders) {
    if (cleanup) cleanup();
    return;
  }
  leaving = cleanup;
  const heading = view.querySelector("h1");
  if (heading) document.title = `${heading.textContent} · Influence Dashboard`;
}

document.getElementById("sign-out").addEventListener("click", () => {
  setToken(null);
  window.location.hash = "#/signin";
});
window.addEventListener("signed-out", () => {
  if (route().page !== "signin") window.location.hash = "#/signin";
});
window.addEventListener("hashchange", render);
render();
