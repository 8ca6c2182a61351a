"""Progress streams per user are capped: one user's streams past GATEWAY_MAX_STREAMS_PER_USER are
a 429 naming the cap, while another user's stream still follows its job."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import httpx

CAP = 20
ATTEMPTS = 200


async def _next_data_line(lines: Any) -> str:
    async for line in lines:
        if line.startswith("data: ") and '"seq"' in line:
            return line
    raise AssertionError("the stream ended without an event")


async def test_streams_past_the_cap_are_429_and_another_user_still_gets_events(
    make_gateway, upstream
) -> None:
    gateway = await make_gateway(gateway_max_streams_per_user=CAP)
    alice = await gateway.sign_in("alice")
    bob = await gateway.sign_in("bob")
    alice_job = upstream.scheduler.add_job("local:alice")
    bob_job = upstream.scheduler.add_job("local:bob")
    limits = httpx.Limits(max_connections=ATTEMPTS + 10, max_keepalive_connections=0)
    async with (
        contextlib.AsyncExitStack() as held,
        httpx.AsyncClient(base_url=gateway.running.url, limits=limits, timeout=30) as client,
    ):

        async def open_stream() -> httpx.Response:
            return await held.enter_async_context(
                client.stream("GET", f"/api/jobs/{alice_job}/events", headers=alice)
            )

        answers = await asyncio.gather(*(open_stream() for _ in range(ATTEMPTS)))
        statuses = [answer.status_code for answer in answers]
        assert statuses.count(200) == CAP and statuses.count(429) == ATTEMPTS - CAP
        refused = next(answer for answer in answers if answer.status_code == 429)
        await refused.aread()
        assert refused.json()["detail"] == (
            f"You have {CAP} progress streams open; the limit is {CAP} per user "
            "(GATEWAY_MAX_STREAMS_PER_USER): close one first"
        )

        # Bob is not limited by Alice's streams and sees his event at once.
        async with client.stream("GET", f"/api/jobs/{bob_job}/events", headers=bob) as response:
            assert response.status_code == 200
            lines = response.aiter_lines()
            await upstream.scheduler.add_event(bob_job, "training", 0.5, step=1)
            started = time.monotonic()
            line = await asyncio.wait_for(_next_data_line(lines), timeout=1)
            assert '"step":1' in line and time.monotonic() - started < 1
        # Alice's open streams still follow her job too.
        await upstream.scheduler.add_event(alice_job, "training", 0.5, step=2)
        open_ones = [answer for answer in answers if answer.status_code == 200]
        assert '"step":2' in await asyncio.wait_for(_next_data_line(open_ones[0].aiter_lines()), timeout=5)

    # Closed streams give their slots back.
    await upstream.scheduler.finish(alice_job, {})
    async with httpx.AsyncClient(base_url=gateway.running.url, timeout=30) as client:
        deadline = time.monotonic() + 5
        while True:
            again = await client.get(f"/api/jobs/{alice_job}/events", headers=alice)
            if again.status_code == 200 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        assert again.status_code == 200, again.text
