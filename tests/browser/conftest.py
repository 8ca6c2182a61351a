"""The dashboard in Debian's chromium (driven by Playwright, never a downloaded browser) against
the whole stack on loopback, with the test fake of RunPod standing in for the cloud."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.stack import REPO_ROOT, FakeRunPodProcess, Stack

from .support import (
    BROKE_RUNPOD_KEY,
    CHROMIUM,
    CHROMIUM_ARGS,
    GOOD_RUNPOD_KEY,
    TEMPLATE_ID,
    ExternalRequests,
    Screenshots,
)


@pytest.fixture(scope="session")
def chromium_path() -> Path:
    # Installs Debian's chromium if it is missing (once per session; no-op when present).
    subprocess.run([str(REPO_ROOT / "scripts" / "ensure_chromium.sh")], check=True)
    return CHROMIUM


@pytest.fixture(scope="module")
def fake_runpod() -> Iterator[FakeRunPodProcess]:
    """The fake RunPod as its own process: one funded key, one key with no balance."""
    process = FakeRunPodProcess.start()
    process.control("POST", "keys", key=GOOD_RUNPOD_KEY, balance=25.0)
    process.control("POST", "keys", key=BROKE_RUNPOD_KEY, balance=0.0)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def stack_overrides() -> dict[str, str]:
    """Extra service settings for one test module's stack (a module overrides this fixture)."""
    return {}


@pytest.fixture(scope="module")
def stack_services() -> tuple[str, ...]:
    """The services of one test module's stack (a module overrides this fixture)."""
    return ("keyvault", "compute-local", "compute-runpod", "scheduler", "gateway")


# Module scope: the stack and the browser (whose sync API runs an event loop in this thread) are
# gone before the next module's asyncio tests start.
@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory,
    fake_runpod: FakeRunPodProcess,
    stack_overrides: dict[str, str],
    stack_services: tuple[str, ...],
) -> Iterator[Stack]:
    with Stack(
        data_dir=tmp_path_factory.mktemp("browser-stack"),
        extra_env={
            "SCHEDULER_POLL_INTERVAL_S": "0.2",
            "COMPUTE_LOCAL_TORCH_THREADS": "1",
            **fake_runpod.settings_env(TEMPLATE_ID),
            "RUNPOD_STREAM_WAIT_MS": "1000",
            **stack_overrides,
        },
        services=stack_services,
    ) as running:
        yield running


@pytest.fixture(scope="module")
def browser(chromium_path: Path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(chromium_path), args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def external_requests(stack: Stack) -> ExternalRequests:
    return ExternalRequests(stack.gateway_url)


@pytest.fixture
def page(browser, stack: Stack, external_requests: ExternalRequests):
    """A fresh browser context per test; any request off the gateway is aborted and recorded,
    and fails the test at teardown."""
    context = browser.new_context(
        base_url=stack.gateway_url, viewport={"width": 1280, "height": 900}, accept_downloads=True
    )

    def guard(route) -> None:
        if external_requests.is_external(route.request.url):
            route.abort()
        else:
            route.continue_()

    context.route("**/*", guard)
    opened = context.new_page()
    console_errors: list[str] = []
    opened.on("pageerror", lambda exc: console_errors.append(str(exc)))
    try:
        yield opened
    finally:
        context.close()
    assert not external_requests.seen, f"requests left the gateway: {external_requests.seen}"
    assert not console_errors, f"uncaught errors in the page: {console_errors}"


@pytest.fixture
def shots(page, request: pytest.FixtureRequest) -> Screenshots:
    return Screenshots(page, request.node.name.removeprefix("test_"))
