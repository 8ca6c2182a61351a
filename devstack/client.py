"""A small synchronous client of the gateway's REST API (demo and end-to-end tests)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import httpx


class GatewayClient:
    def __init__(self, base_url: str, timeout_s: float = 30.0) -> None:
        self.http = httpx.Client(base_url=base_url, timeout=timeout_s)
        self.token = ""

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def sign_in_locally(self, username: str) -> str:
        reply = self.http.post("/api/auth/local", json={"username": username})
        reply.raise_for_status()
        self.token = reply.json()["access_token"]
        return self.token

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {**self.headers, **kwargs.pop("headers", {})}
        return self.http.request(method, path, headers=headers, **kwargs)

    def submit(self, spec: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        reply = self.request("POST", "/api/train", json=spec, headers=headers)
        if reply.status_code != 202:
            raise RuntimeError(f"submit failed: {reply.status_code} {reply.text}")
        return reply.json()

    def job(self, job_id: str) -> dict[str, Any]:
        reply = self.request("GET", f"/api/jobs/{job_id}")
        reply.raise_for_status()
        return reply.json()

    def results(self, job_id: str) -> dict[str, Any]:
        reply = self.request("GET", f"/api/jobs/{job_id}/results")
        reply.raise_for_status()
        return reply.json()

    def events(self, job_id: str, after: int = 0, timeout_s: float = 900.0) -> Iterator[dict[str, Any]]:
        """Server-Sent Events until the stream's end event."""
        with self.http.stream(
            "GET",
            f"/api/jobs/{job_id}/events",
            params={"after": after},
            headers=self.headers,
            timeout=httpx.Timeout(timeout_s, connect=10.0),
        ) as reply:
            reply.raise_for_status()
            event_name, data = "message", []
            for line in reply.iter_lines():
                if line.startswith("event:"):
                    event_name = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].strip())
                elif line == "":
                    if event_name == "end":
                        return
                    if data:
                        yield json.loads("\n".join(data))
                    event_name, data = "message", []


def reads_as_words(answer: str) -> bool:
    """An answer a person can read: printable, no undecodable bytes (gpu_core shows them as
    ``\\xNN``), and mostly letters (not "????????")."""
    text = answer.strip()
    letters = sum(len(word) for word in re.findall(r"[A-Za-z]+", text))
    return (
        bool(text) and text.isprintable() and "\\x" not in text and letters >= len(text.replace(" ", "")) / 2
    )


def summarise_result(result: dict[str, Any]) -> str:
    lines = ["", "evaluation          exact match   mean loss"]
    for name in ("base", "few_shot", "finetuned"):
        metrics = result["eval_results"][name]["metrics"]
        lines.append(f"  {name:<17} {metrics['exact_match_rate']:>10.2f}   {metrics['mean_loss']:>9.3f}")
    lines.append("\nanswers (base | few-shot | fine-tuned; * exact match)")
    by_run = {
        name: {example["id"]: example for example in result["eval_results"][name]["examples"]}
        for name in ("base", "few_shot", "finetuned")
    }
    for eval_id in by_run["finetuned"]:
        answers = [by_run[name].get(eval_id) for name in ("base", "few_shot", "finetuned")]
        cells = [
            f"{(a['output'] if a else '-')!r:<18}{'*' if a and a['exact_match'] else ' '}" for a in answers
        ]
        lines.append(f"  {eval_id:<12} " + " | ".join(cells))
    base = list(by_run["base"].values())
    readable = sum(reads_as_words(example["output"]) for example in base)
    tuned = result["eval_results"]["finetuned"]["metrics"]["exact_match_rate"]
    lines.append(f"\nbase answers that read as words: {readable} of {len(base)}")
    lines.append(f"fine-tuned exact match: {tuned:.3f}")
    influence = result["influence"]
    lines.append(
        f"\ninfluence ({influence['method']}): {len(influence['eval_ids'])} eval x "
        f"{len(influence['train_ids'])} train"
    )
    for eval_id in influence["eval_ids"]:
        top = influence["top_k"][eval_id]
        helpful = ", ".join(f"{s['id']} ({s['score']:+.3g})" for s in top["helpful"][:3]) or "none"
        harmful = ", ".join(f"{s['id']} ({s['score']:+.3g})" for s in top["harmful"][:2]) or "none"
        lines.append(f"  {eval_id:<12} helped by {helpful}; hurt by {harmful}")
    return "\n".join(lines)
