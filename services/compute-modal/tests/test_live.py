"""Against the real Modal: runs only with the operator's token and a deployed app
(``make modal-deploy``); a tiny-model experiment end to end."""

from __future__ import annotations

import asyncio
import json
import os
import uuid

import pytest
from pydantic import SecretStr

from compute_modal.adapter import ModalSdkAdapter
from compute_modal.config import Settings
from compute_modal.provider import ModalProvider, State
from gpu_core.schemas import ExperimentResult

pytestmark = [
    pytest.mark.skipif(
        not os.environ.get("MODAL_TOKEN_ID"), reason="MODAL_TOKEN_ID is not set (live Modal test)"
    ),
    pytest.mark.slow,
    pytest.mark.timeout(1800),
]


async def test_tiny_experiment_on_modal(make_spec) -> None:
    settings = Settings.load()
    adapter = ModalSdkAdapter(
        SecretStr(os.environ["MODAL_TOKEN_ID"]),
        settings.modal_token_secret,
        settings.modal_environment,
        settings.modal_app_name,
        settings.modal_function_name,
        settings.modal_progress_dict,
    )
    provider = ModalProvider(
        adapter, settings.modal_app_name, settings.modal_function_name, settings.modal_environment
    )
    assert (await provider.verify("")).valid
    job_id = f"live-{uuid.uuid4().hex[:8]}"
    call_id = await provider.submit(job_id, json.dumps(make_spec()).encode())
    assert call_id.startswith("fc-")
    cursor, stages = "", set()
    while True:
        status = await provider.status(call_id, job_id, cursor)
        cursor = str(status.cursor)
        stages |= {item.event.get("stage") for item in status.events}
        if status.state not in (State.SUBMITTED, State.RUNNING):
            break
        await asyncio.sleep(5)  # polling a remote service: there is no event to await
    assert status.state is State.COMPLETED, status.error
    assert "training" in stages
    result = ExperimentResult.model_validate_json(await provider.result(call_id))
    assert result.influence.method == "tracin"
