"""The GitHub workflows parse and publish what the operators' instructions promise."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / ".github" / "workflows"
SERVICES_WITH_IMAGES = sorted(p.parent.name for p in (REPO / "services").glob("*/Dockerfile"))
PINNED_ACTION = re.compile(r"^[\w.-]+/[\w.-]+@(v\d+\.\d+\.\d+|[0-9a-f]{40})$")


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((WORKFLOWS / name).read_text())


def triggers(workflow: dict[str, Any]) -> dict[str, Any]:
    # YAML 1.1 reads the bare key `on` as the boolean True.
    return workflow[True]


def steps(workflow: dict[str, Any]) -> list[dict[str, Any]]:
    return [step for job in workflow["jobs"].values() for step in job["steps"]]


def build_step(workflow: dict[str, Any]) -> dict[str, Any]:
    (step,) = [s for s in steps(workflow) if s.get("uses", "").startswith("docker/build-push-action@")]
    return step["with"]


@pytest.mark.parametrize("name", ["publish-worker.yml", "publish-services.yml", "ci.yml"])
def test_workflow_parses_and_pins_its_actions(name: str) -> None:
    workflow = load(name)
    assert workflow["name"] and workflow["jobs"]
    for step in steps(workflow):
        if "uses" in step:
            assert PINNED_ACTION.match(step["uses"]), f"{name}: {step['uses']} is not pinned to a version"


def test_worker_is_published_on_pushes_to_main_touching_gpu_core_or_the_worker() -> None:
    workflow = load("publish-worker.yml")
    push = triggers(workflow)["push"]
    assert push["branches"] == ["main"]
    assert set(push["paths"]) == {"gpu_core/**", "services/compute-runpod/worker/**"}
    assert workflow["permissions"]["packages"] == "write"
    build = build_step(workflow)
    assert build["context"] == "."
    assert build["file"] == "services/compute-runpod/worker/Dockerfile"
    assert (REPO / build["file"]).is_file()
    assert build["push"] is True
    assert set(build["tags"].strip().split("\n")) == {
        "ghcr.io/${{ github.repository }}/influence-worker:latest",
        "ghcr.io/${{ github.repository }}/influence-worker:${{ github.sha }}",
    }
    login = next(s for s in steps(workflow) if s.get("uses", "").startswith("docker/login-action@"))
    assert login["with"]["registry"] == "ghcr.io"


def test_every_service_image_is_published() -> None:
    workflow = load("publish-services.yml")
    push = triggers(workflow)["push"]
    assert push["branches"] == ["main"]
    assert workflow["permissions"]["packages"] == "write"
    (job,) = workflow["jobs"].values()
    assert sorted(job["strategy"]["matrix"]["service"]) == SERVICES_WITH_IMAGES
    build = build_step(workflow)
    assert build["file"] == "services/${{ matrix.service }}/Dockerfile"
    assert build["context"] == "."
    tags = build["tags"].split("\n")
    assert "ghcr.io/${{ github.repository }}/influence-${{ matrix.service }}:latest" in tags
    assert "ghcr.io/${{ github.repository }}/influence-${{ matrix.service }}:${{ github.sha }}" in tags


def test_service_images_rebuild_when_anything_they_copy_changes() -> None:
    paths = triggers(load("publish-services.yml"))["push"]["paths"]
    prefixes = [p.removesuffix("**") for p in paths]
    for service in SERVICES_WITH_IMAGES:
        dockerfile = (REPO / "services" / service / "Dockerfile").read_text()
        for source in re.findall(r"^COPY (?!--from)(\S+) ", dockerfile, flags=re.M):
            assert any(source == p.rstrip("/") or source.startswith(p) for p in prefixes), (
                f"{service} copies {source}, which no trigger path covers"
            )


def test_prod_overlay_deploys_the_published_image_names() -> None:
    prod = yaml.safe_load((REPO / "deploy/k8s/overlays/prod/kustomization.yaml").read_text())
    images = {image["name"]: image["newName"] for image in prod["images"]}
    assert sorted(images) == [f"influence-{s}" for s in SERVICES_WITH_IMAGES]
    for name, new_name in images.items():
        assert new_name.startswith("ghcr.io/") and new_name.endswith(f"/{name}")


def test_ci_runs_make_test_on_pushes_and_pull_requests() -> None:
    workflow = load("ci.yml")
    on = triggers(workflow)
    assert "pull_request" in on and on["push"]["branches"] == ["main"]
    assert any(step.get("run", "").strip() == "make test" for step in steps(workflow))
