"""jsonb through the scheduler's pool: a NUL in a string (a random model's generated answer can
hold one) is stored as U+FFFD, where PostgreSQL would refuse the whole row."""

from __future__ import annotations

from scheduler.db import create_pool, encode_jsonb


def test_only_a_real_nul_escape_is_replaced() -> None:
    assert encode_jsonb({"answer": "a\x00b"}) == '{"answer": "a\\ufffdb"}'
    # The six characters \u0000 typed as text, and an escaped backslash before a NUL.
    assert encode_jsonb("\\u0000") == '"\\\\u0000"'
    assert encode_jsonb("\\\x00") == '"\\\\\\ufffd"'


async def test_a_result_with_a_nul_is_stored(database_url: str) -> None:
    pool = await create_pool(database_url, max_size=1)
    try:
        stored = await pool.fetchval("SELECT $1::jsonb", {"answers": ["ok", "\x00\x00 red"]})
    finally:
        await pool.close()
    assert stored == {"answers": ["ok", "\ufffd\ufffd red"]}
