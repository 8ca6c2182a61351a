"""The GitHub workflows parse and publish what the operators' instructions promise."""

from __future__ import annotations

import re
import subprocess
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
        "${{ steps.image.outputs.path }}/influence-worker:latest",
        "${{ steps.image.outputs.path }}/influence-worker:${{ github.sha }}",
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
    assert "${{ steps.image.outputs.path }}/influence-${{ matrix.service }}:latest" in tags
    assert "${{ steps.image.outputs.path }}/influence-${{ matrix.service }}:${{ github.sha }}" in tags


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


@pytest.mark.parametrize("name", ["publish-worker.yml", "publish-services.yml"])
def test_images_are_pushed_to_a_lower_case_path(name: str, tmp_path: Path) -> None:
    """GHCR refuses upper-case repository paths, and github.repository keeps the owner's case
    (e.g. My-Org/Influence): every tag goes through the step that lower-cases it."""
    workflow = load(name)
    (image_step,) = [s for s in steps(workflow) if s.get("id") == "image"]
    output = tmp_path / "github_output"
    subprocess.run(
        ["bash", "-c", image_step["run"]],
        env={"GITHUB_REPOSITORY": "My-Org/Influence-Dashboard", "GITHUB_OUTPUT": str(output)},
        check=True,
    )
    assert output.read_text() == "path=ghcr.io/my-org/influence-dashboard\n"
    tags = build_step(workflow)["tags"]
    assert "github.repository" not in tags
    assert all("steps.image.outputs.path" in tag for tag in tags.strip().split("\n"))


def test_the_worker_image_has_one_name_everywhere() -> None:
    """The workflow publishes influence-worker; the Dockerfile, INSTRUCTIONS.md and `make images`
    name the same image."""
    tags = build_step(load("publish-worker.yml"))["tags"]
    assert set(re.findall(r"/(influence-[\w-]+):", tags)) == {"influence-worker"}
    dockerfile = (REPO / "services/compute-runpod/worker/Dockerfile").read_text()
    instructions = (REPO / "INSTRUCTIONS.md").read_text()
    makefile = (REPO / "Makefile").read_text()
    for text in (dockerfile, instructions):
        named = set(re.findall(r"ghcr\.io/<owner>/<repo>/(influence-[\w-]+)", text))
        assert "influence-worker" in named
        assert not {n for n in named if "worker" in n} - {"influence-worker"}
    assert "$(IMAGE_PREFIX)worker:$(IMAGE_TAG)" in makefile
