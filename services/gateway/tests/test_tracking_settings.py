"""Settings -> Experiment tracking: the researcher's MLflow and W&B; the W&B key and the MLflow
token go to keyvault (like the Hugging Face token), answers show their last 4, never the rest."""

from __future__ import annotations

import logging

W_KEY = "wandbkey0123456789abcdefghijklmnopqrsWXYZ"
M_TOKEN = "mlflowtoken-0123456789-abcdTOKN"


async def test_wandb_and_mlflow_settings_store_secrets_in_keyvault_only(gateway, upstream, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    headers = await gateway.sign_in("alice")
    client = gateway.client
    empty = await client.get("/api/settings/tracking", headers=headers)
    assert empty.status_code == 200, empty.text
    assert empty.json()["wandb"] == {"project": None, "entity": None, "has_key": False, "key_last4": None}
    assert empty.json()["operator_wandb"] is True

    # W&B needs a key the first time.
    keyless = await client.put("/api/settings/tracking/wandb", json={"project": "p"}, headers=headers)
    assert keyless.status_code == 422 and "api_key" in keyless.text

    responses = [
        await client.put(
            "/api/settings/tracking/wandb",
            json={"project": "lr-sweeps", "entity": "lab", "api_key": W_KEY},
            headers=headers,
        ),
        await client.put(
            "/api/settings/tracking/mlflow",
            json={"tracking_uri": "https://mlflow.example/", "experiment_name": "x", "token": M_TOKEN},
            headers=headers,
        ),
    ]
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    view = responses[-1].json()
    assert view["wandb"] == {"project": "lr-sweeps", "entity": "lab", "has_key": True, "key_last4": "WXYZ"}
    assert view["mlflow"] == {
        "tracking_uri": "https://mlflow.example",
        "experiment_name": "x",
        "has_token": True,
        "token_last4": "TOKN",
    }
    stored = {(r.provider, r.plaintext) for r in upstream.keyvault.store_requests}
    assert stored == {("wandb", W_KEY), ("mlflow", M_TOKEN)}
    # A new project keeps the stored key.
    renamed = await client.put("/api/settings/tracking/wandb", json={"project": "other"}, headers=headers)
    assert renamed.json()["wandb"]["key_last4"] == "WXYZ" and renamed.json()["mlflow"]["tracking_uri"]
    responses.append(renamed)

    bad = await client.put("/api/settings/tracking/mlflow", json={"tracking_uri": "ftp://x"}, headers=headers)
    assert bad.status_code == 422 and "mlflow_tracking_uri" in bad.text

    removed = await client.delete("/api/settings/tracking/wandb", headers=headers)
    assert removed.json()["wandb"] == {"project": None, "entity": None, "has_key": False, "key_last4": None}
    assert removed.json()["mlflow"]["has_token"] is True  # the other tracker stays
    responses.append(removed)
    for secret in (W_KEY, M_TOKEN):
        assert all(secret not in r.text for r in responses)
        assert secret not in caplog.text and all(secret not in str(r.__dict__) for r in caplog.records)
