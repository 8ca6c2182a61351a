"""Python client of the Influence Dashboard REST API, and the ``influence`` command.

from influence_client import Client
client = Client(); client.sign_in("me")
job = client.submit("examples/sample.json"); client.wait(job.job_id)
"""

from influence_client.client import (
    DEFAULT_API,
    AsyncClient,
    Client,
    InfluenceError,
    load_spec,
)
from influence_client.results import eval_rows, influence_rows, write_csv

__all__ = [
    "DEFAULT_API",
    "AsyncClient",
    "Client",
    "InfluenceError",
    "eval_rows",
    "influence_rows",
    "load_spec",
    "write_csv",
]
