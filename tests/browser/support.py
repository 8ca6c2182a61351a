"""Constants and helpers shared by the browser tests and their fixtures."""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import urlsplit

from devstack.client import GatewayClient
from devstack.stack import REPO_ROOT

CHROMIUM = Path(os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless=new",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOTS = REPO_ROOT / "artifacts" / "screenshots"
GOOD_RUNPOD_KEY = "rpa_browsertest_GOOD_key_7Q2x"
BROKE_RUNPOD_KEY = "rpa_browsertest_NO_FUNDS_k9Z1"
TEMPLATE_ID = "influence-template"


class ExternalRequests:
    """Every request the page made to a host other than the gateway."""

    def __init__(self, gateway_url: str) -> None:
        self.gateway_netloc = urlsplit(gateway_url).netloc
        self.seen: list[str] = []

    def is_external(self, url: str) -> bool:
        """Records ``url`` when it leaves the gateway (in-page data/blob URLs do not)."""
        parts = urlsplit(url)
        if parts.scheme in ("data", "blob", "about") or parts.netloc == self.gateway_netloc:
            return False
        self.seen.append(url)
        return True


class Screenshots:
    """Numbered full-page screenshots of one test, in artifacts/screenshots/."""

    def __init__(self, page, test_name: str) -> None:
        self.page = page
        self.prefix = test_name
        self.count = 0
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        """The next numbered path, for a screenshot of one element."""
        self.count += 1
        return SCREENSHOTS / f"{self.prefix}-{self.count:02d}-{name}.png"

    def take(self, name: str) -> Path:
        self.count += 1
        path = SCREENSHOTS / f"{self.prefix}-{self.count:02d}-{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path


def sign_in(page, username: str) -> None:
    """The local sign-in, ending on the experiments list."""
    page.goto("/")
    page.get_by_label("Username").fill(username)
    page.get_by_role("button", name="Sign in", exact=True).click()
    page.get_by_role("heading", name="Experiments", exact=True).wait_for()


def page_api_client(page, gateway_url: str) -> GatewayClient:
    """The REST client signed in as the page's user (the token the page keeps)."""
    client = GatewayClient(gateway_url)
    client.token = page.evaluate("sessionStorage.getItem('influence.token')")
    assert client.token
    return client


def sample_spec(n_train: int, n_eval: int, epochs: int) -> dict:
    """examples/sample.json cut down to a quick experiment on the random tiny model (the tests'
    figures are calibrated on it; the sample itself names local/tiny-chat)."""
    spec = json.loads((REPO_ROOT / "examples" / "sample.json").read_text())
    spec["model_id"] = "local/tiny-llama"
    spec["training_data"] = spec["training_data"][:n_train]
    spec["eval_data"] = spec["eval_data"][:n_eval]
    spec["hyperparams"].update(epochs=epochs, max_seq_len=48, max_new_tokens=4)
    return spec
