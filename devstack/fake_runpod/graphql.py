"""GraphQL (``/graphql``): ``myself`` only, the account and its balance."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from devstack.fake_runpod.state import json_body

if TYPE_CHECKING:
    from devstack.fake_runpod.fake import FakeRunPod


def add_graphql_routes(app: FastAPI, fake: FakeRunPod) -> None:
    @app.post("/graphql")
    async def graphql(request: Request) -> Response:
        account = fake.gate(request, "graphql", anonymous_ok=True)
        if not fake.graphql_enabled:
            return JSONResponse(
                {"errors": [{"message": "the GraphQL API has been retired; use REST v2"}]},
                status_code=410,
            )
        body = await json_body(request)
        query = str(body.get("query", "")) if isinstance(body, dict) else ""
        if "myself" not in query:
            return JSONResponse({"errors": [{"message": "the fake supports only myself"}]})
        if account is None:
            return JSONResponse({"data": {"myself": None}})
        return JSONResponse(
            {
                "data": {
                    "myself": {
                        "id": account.account_id,
                        "clientBalance": account.balance,
                        "currentSpendPerHr": 0.0,
                        "spendLimit": 80,
                    }
                }
            }
        )
