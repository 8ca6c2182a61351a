"""Constants and helpers shared by the browser tests and their fixtures."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

from devstack.stack import REPO_ROOT

CHROMIUM = Path(os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox", "--headless=new", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
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

    def take(self, name: str) -> Path:
        self.count += 1
        path = SCREENSHOTS / f"{self.prefix}-{self.count:02d}-{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path
