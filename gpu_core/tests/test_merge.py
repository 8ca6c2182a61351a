"""Merged weights (gpu_core.merge) on a real tiny experiment: the files load with plain
``AutoModelForCausalLM.from_pretrained`` (no peft) and reproduce the fine-tuned eval losses
(rel 1e-4), sharded as asked; every file written is a planned name; bad input is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from gpu_core.data import batches
from gpu_core.evaluation import target_losses
from gpu_core.jobs import MERGE, JobInputError, make_payload, parse_payload, run_job
from gpu_core.merge_schemas import MERGED_DIR, MergeResult, planned_merge_names
from gpu_core.pipeline import experiment_encoder, run_experiment_to_result
from gpu_core.schemas import ExperimentResult, ExperimentSpec


@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory) -> tuple[ExperimentSpec, ExperimentResult, Path]:
    raw = json.loads((Path(__file__).parent / "data" / "copy_task_64x16.json").read_text())
    raw["training_data"], raw["eval_data"] = raw["training_data"][:12], raw["eval_data"][:5]
    raw["hyperparams"].update(epochs=2, batch_size=4)
    spec = ExperimentSpec.model_validate(raw)
    directory = tmp_path_factory.mktemp("merge-parent")
    return spec, run_experiment_to_result(spec, directory), directory


def merge(experiment: Any, out: Path, request: dict[str, Any]) -> tuple[MergeResult, list[dict[str, Any]]]:
    spec, result, parent_dir = experiment
    payload = make_payload(MERGE, spec.model_dump(mode="json"), request, result.model_dump(mode="json"))
    events = list(
        run_job(parse_payload(json.loads(json.dumps(payload))), out, parent_artifacts_dir=parent_dir)
    )
    assert events[-1]["type"] == "result", events[-1]
    return MergeResult.model_validate(events[-1]["result"]), events[:-1]


def test_merged_files_load_with_from_pretrained_and_reproduce_the_finetuned_losses(
    experiment: Any, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec, result, _ = experiment
    merged, events = merge(experiment, tmp_path, {"shard_size_mb": 0.1})
    assert events and all(event["stage"] == "merge" for event in events)
    assert (
        merged.dtype == "float32" and merged.merged_on == "cpu" and merged.experiment_quantization == "none"
    )
    # 0.1 MB shards of a ~0.36 MB model: several shards and their index, renamed as planned.
    assert merged.shards >= 3 and "model.safetensors.index.json" in merged.files
    assert "model-00001.safetensors" in merged.files and "config.json" in merged.files
    listed = {entry.name for entry in merged.artifacts}
    assert listed == {f"{MERGED_DIR}/{name}" for name in merged.files}
    assert listed <= set(planned_merge_names()), listed - set(planned_merge_names())
    assert merged.check.passed is True and merged.check.tolerance == 1e-4
    assert merged.check.max_relative_difference <= 1e-4

    # Independently of the job's own check: plain transformers, no peft, the experiment's encoding.
    folder = tmp_path / MERGED_DIR
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert not any("lora" in name for name, _ in model.named_parameters())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    encoder = experiment_encoder(spec, tokenizer)
    losses: list[float] = []
    for chunk in batches(spec.eval_data, spec.hyperparams.batch_size):
        pairs = [encoder.encode(example.turns, last_only=True) for example in chunk]
        losses += target_losses(model, pairs, tokenizer.pad_token_id, model.device)
    expected = [outcome.loss for outcome in result.eval_results.finetuned.examples]
    assert losses == pytest.approx(expected, rel=1e-4)
    # The merge changed the model: the base's losses are not the fine-tuned ones.
    base = [outcome.loss for outcome in result.eval_results.base.examples]
    assert losses != pytest.approx(base, rel=1e-2)


def test_one_shard_by_default_and_bad_requests_name_the_field(experiment: Any, tmp_path: Path) -> None:
    merged, _ = merge(experiment, tmp_path, {})
    assert merged.shards == 1 and "model.safetensors" in merged.files
    spec, result, parent_dir = experiment
    for request, field in (({"shard_size_mb": 0}, "shard_size_mb"), ({"surprise": 1}, "surprise")):
        with pytest.raises(JobInputError, match=field):
            parse_payload(
                make_payload(MERGE, spec.model_dump(mode="json"), request, result.model_dump(mode="json"))
            )
    no_files = result.model_copy(update={"artifacts": []})
    with pytest.raises(JobInputError, match="stored no adapter"):
        parse_payload(make_payload(MERGE, spec.model_dump(mode="json"), {}, no_files.model_dump(mode="json")))
    # An adapter gone from the experiment's folder is named, not a crash deep in peft.
    empty = tmp_path / "gone"
    empty.mkdir()
    job = parse_payload(make_payload(MERGE, spec.model_dump(mode="json"), {}, result.model_dump(mode="json")))
    with pytest.raises(JobInputError, match="adapter is no longer stored"):
        list(run_job(job, tmp_path / "out", parent_artifacts_dir=empty))
    shutil.rmtree(tmp_path / MERGED_DIR)
