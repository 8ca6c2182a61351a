// Sign in: the local sign-in (AUTH_MODE=local) or a bearer token from the identity provider.

import { api, ApiError, setToken, token } from "../api.js";
import { announce, el } from "../ui.js";

function signedIn(accessToken) {
  setToken(accessToken);
  announce("Signed in");
  window.location.hash = "#/jobs";
}

export function renderSignIn(view) {
  const username = el("input", {
    id: "username", name: "username", type: "text", autocomplete: "username", required: true,
    pattern: "[A-Za-z0-9._@\\-]{1,64}", maxlength: 64, "aria-describedby": "username-help",
  });
  const localForm = el(
    "form", { class: "card", "aria-labelledby": "local-heading" },
    el("h2", { id: "local-heading" }, "Local sign-in"),
    el("label", { for: "username" }, "Username"),
    username,
    el("p", { id: "username-help", class: "help" },
      "For a stack on your own machine: no password, 1-64 letters, digits or . _ @ -"),
    el("button", { type: "submit" }, "Sign in"),
  );
  localForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      const answer = await api("POST", "/api/auth/local", { body: { username: username.value.trim() } });
      signedIn(answer.access_token);
    } catch (error) {
      const text = error instanceof ApiError && error.status === 404
        ? "Local sign-in is turned off on this server; paste a token from your identity provider below"
        : `Sign-in failed: ${error.message}`;
      announce(text, "error");
    }
  });

  const bearer = el("input", {
    id: "bearer-token", name: "bearer-token", type: "password", autocomplete: "off",
    required: true, "aria-describedby": "bearer-help",
  });
  const tokenForm = el(
    "form", { class: "card", "aria-labelledby": "token-heading" },
    el("h2", { id: "token-heading" }, "Sign in with a token"),
    el("label", { for: "bearer-token" }, "Bearer token"),
    bearer,
    el("p", { id: "bearer-help", class: "help" },
      "Paste the access token (JWT) your identity provider issued; it is kept for this tab only."),
    el("button", { type: "submit" }, "Use token"),
  );
  tokenForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    setToken(bearer.value.trim());
    bearer.value = "";
    try {
      await api("GET", "/api/settings/compute");
      signedIn(token());
    } catch (error) {
      setToken(null);
      announce(`That token was not accepted: ${error.message}`, "error");
    }
  });

  view.append(
    el("h1", {}, "Sign in"),
    el("div", { class: "columns" }, localForm, tokenForm),
  );
}
