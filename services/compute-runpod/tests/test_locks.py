"""KeyedLocks: one lock per key while in use, and a table that shrinks back to empty."""

from __future__ import annotations

import asyncio

import pytest

from compute_runpod.locks import KeyedLocks


async def test_one_key_is_held_by_one_caller_at_a_time_and_forgotten_after() -> None:
    locks = KeyedLocks()
    inside: list[str] = []
    overlaps: list[tuple[str, ...]] = []

    async def prepare(user: str, name: str) -> None:
        async with locks.hold(user):
            inside.append(name)
            overlaps.append(tuple(inside))
            await asyncio.sleep(0.01)
            inside.remove(name)

    await asyncio.gather(*(prepare("alice", f"a{i}") for i in range(5)))
    assert all(len(seen) == 1 for seen in overlaps)
    assert len(locks) == 0


async def test_different_keys_do_not_wait_for_each_other() -> None:
    locks = KeyedLocks()
    release = asyncio.Event()

    async def hold_until_released(key: str) -> None:
        async with locks.hold(key):
            await release.wait()

    holders = [asyncio.create_task(hold_until_released(f"user-{i}")) for i in range(3)]
    await asyncio.sleep(0.01)
    assert len(locks) == 3  # all three inside at once
    release.set()
    await asyncio.gather(*holders)
    assert len(locks) == 0


async def test_the_table_stays_bounded_by_keys_in_use_across_many_users() -> None:
    locks = KeyedLocks()
    peak = 0

    async def once(key: str) -> None:
        nonlocal peak
        async with locks.hold(key):
            peak = max(peak, len(locks))
            await asyncio.sleep(0)

    for batch in range(20):  # 2,000 distinct users, 100 at a time
        await asyncio.gather(*(once(f"user-{batch}-{i}") for i in range(100)))
        assert len(locks) == 0
    assert peak == 100


async def test_a_failure_inside_releases_the_lock_and_forgets_the_key() -> None:
    locks = KeyedLocks()
    with pytest.raises(RuntimeError):
        async with locks.hold("alice"):
            raise RuntimeError("endpoint creation failed")
    assert len(locks) == 0
    async with asyncio.timeout(1):
        async with locks.hold("alice"):
            assert len(locks) == 1


async def test_a_cancelled_waiter_leaves_no_entry_behind() -> None:
    locks = KeyedLocks()
    release = asyncio.Event()

    async def holder() -> None:
        async with locks.hold("alice"):
            await release.wait()

    async def waiter() -> None:
        async with locks.hold("alice"):
            pass

    held = asyncio.create_task(holder())
    await asyncio.sleep(0)
    waiting = asyncio.create_task(waiter())
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    release.set()
    await held
    assert len(locks) == 0
