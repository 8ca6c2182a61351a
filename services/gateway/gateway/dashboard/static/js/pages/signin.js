// Sign in: the local sign-in (AUTH_MODE=local) or a bearer token from the identity provider.

import { api, ApiError, setToken, token } from "../api.js";
import { announce, el } from "../ui.js";

function signedIn(accessToken) {
  setToken(accessToken);
  announce("Signed in");
  window.location.hash = "#/jobs";
}

// One card per way of signing in: heading, labelled input with its help, submit button.
function signInForm({ headingId, heading, input, label, help, button, onSubmit }) {
  const form = el(
    "form", { class: "card", "aria-labelledby": headingId },
    el("h2", { id: headingId }, heading),
    el("label", { for: input.id }, label),
    input,
    el("p", { id: input.getAttribute("aria-describedby"), class: "help" }, help),
    el("button", { type: "submit" }, button),
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    return onSubmit();
  });
  return form;
}

export function renderSignIn(view) {
  const username = el("input", {
    id: "username", name: "username", type: "text", autocomplete: "username", required: true,
    pattern: "[A-Za-z0-9._@\\-]{1,64}", maxlength: 64, "aria-describedby": "username-help",
  });
  const localForm = signInForm({
    headingId: "local-heading",
    heading: "Local sign-in",
    input: username,
    label: "Username",
    help: "For a stack on your own machine: no password, 1-64 letters, digits or . _ @ -",
    button: "Sign in",
    onSubmit: async () => {
      try {
        const answer = await api("POST", "/api/auth/local", { body: { username: username.value.trim() } });
        signedIn(answer.access_token);
      } catch (error) {
        const text = error instanceof ApiError && error.status === 404
          ? "Local sign-in is turned off on this server; paste a token from your identity provider below"
          : `Sign-in failed: ${error.message}`;
        announce(text, "error");
      }
    },
  });

  const bearer = el("input", {
    id: "bearer-token", name: "bearer-token", type: "password", autocomplete: "off",
    required: true, "aria-describedby": "bearer-help",
  });
  const tokenForm = signInForm({
    headingId: "token-heading",
    heading: "Sign in with a token",
    input: bearer,
    label: "Bearer token",
    help: "Paste the access token (JWT) your identity provider issued; it is kept for this tab only.",
    button: "Use token",
    onSubmit: async () => {
      setToken(bearer.value.trim());
      bearer.value = "";
      try {
        await api("GET", "/api/settings/compute");
        signedIn(token());
      } catch (error) {
        setToken(null);
        announce(`That token was not accepted: ${error.message}`, "error");
      }
    },
  });

  view.append(
    el("h1", {}, "Sign in"),
    el("div", { class: "columns" }, localForm, tokenForm),
  );
}
