"""Bring your own GPU in the browser against the stack as `DEVSTACK_FAKE_RUNPOD=1 make run`
starts it (devstack.stack.SimulatedRunPod: the fake RunPod with a funded test key, the dashboard
told the RunPod is simulated), on free ports."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from devstack.stack import SimulatedRunPod, Stack

from .support import Screenshots, sign_in
from .test_dashboard import runpod_job_completes

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def simulated() -> Iterator[SimulatedRunPod]:
    running = SimulatedRunPod.start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, simulated: SimulatedRunPod) -> Iterator[Stack]:
    with Stack(
        data_dir=tmp_path_factory.mktemp("simulated-runpod-stack"),
        extra_env={
            "SCHEDULER_POLL_INTERVAL_S": "0.2",
            "COMPUTE_LOCAL_TORCH_THREADS": "1",
            "RUNPOD_STREAM_WAIT_MS": "1000",
            **simulated.stack_env(),
        },
    ) as running:
        yield running


def test_byok_end_to_end_on_the_simulated_runpod(
    page, stack: Stack, simulated: SimulatedRunPod, shots: Screenshots
) -> None:
    sign_in(page, "sim")
    page.get_by_role("link", name="Settings").click()
    page.get_by_role("heading", name="Compute", exact=True).wait_for()
    page.get_by_label("Bring your own GPU (RunPod)").check()
    notice = page.locator("#runpod-simulated")
    assert "This RunPod is simulated" in notice.inner_text()
    assert "no real money" in notice.inner_text()
    shots.take("settings-simulated-runpod")

    page.get_by_label("RunPod API key").fill(simulated.test_key)
    page.get_by_role("button", name="Save & Verify").click()
    page.locator("#key-saved", has_text=f"ending in {simulated.test_key[-4:]}").wait_for()
    assert "balance $25.00" in page.locator("#key-saved").inner_text()
    assert simulated.test_key not in page.content()

    runpod_job_completes(page, stack.gateway_url)
    shots.take("simulated-runpod-job-completed")
    # It ran on the fake's worker, under the runpod SDK's own loop.
    takes = [r for r in simulated.fake.requests("worker.take") if r["status"] == 200]
    assert len(takes) == 1
    page.get_by_role("link", name="Settings").click()
    page.locator('#step-ready[data-state="done"]').wait_for()
