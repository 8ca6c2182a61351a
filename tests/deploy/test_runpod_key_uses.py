"""Settings tells a researcher every RunPod call the dashboard makes with their key: the list on
the page is the list of calls compute-runpod's client can make, no more and no fewer."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CLIENT = REPO / "services/compute-runpod/compute_runpod/client.py"
SETTINGS_PAGE = REPO / "services/gateway/gateway/dashboard/static/js/pages/settings.js"
# The first argument of these RunPodClient methods names the call (its metrics label too).
CALL_METHODS = {"_rest", "_request", "_job_get"}


def client_calls() -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(CLIENT.read_text())):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in CALL_METHODS
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names.add(node.args[0].value)
    return names


def test_settings_names_every_runpod_call_and_only_those() -> None:
    calls = client_calls()
    assert {"job.run", "serverless.create", "graphql"} <= calls  # the parse found the client's calls
    listed = re.findall(r'keyUse\("([\w.]+)"', SETTINGS_PAGE.read_text())
    assert len(listed) == len(set(listed))
    assert set(listed) == calls


def test_settings_links_to_runpods_api_key_page() -> None:
    page = SETTINGS_PAGE.read_text()
    assert 'href: "https://console.runpod.io/user/credentials"' in page
    assert "nothing else" not in page  # the list says it, call by call
