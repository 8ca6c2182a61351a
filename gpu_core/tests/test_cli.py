"""``python -m gpu_core run`` end to end, and its answer to a bad spec."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from gpu_core.cli import EXIT_BAD_SPEC, main


@pytest.mark.slow
def test_run_writes_the_result_and_reusable_artifacts(copy_task: dict[str, Any], tmp_path: Path) -> None:
    spec = dict(copy_task, training_data=copy_task["training_data"][:32])
    spec["eval_data"] = copy_task["eval_data"][:8]
    spec["hyperparams"] = dict(spec["hyperparams"], epochs=3)
    spec_path, out, artifacts = tmp_path / "spec.json", tmp_path / "out" / "result.json", tmp_path / "art"
    spec_path.write_text(json.dumps(spec))
    done = subprocess.run(
        [sys.executable, "-m", "gpu_core", "run", str(spec_path), "--out", str(out)]
        + ["--artifacts", str(artifacts)],
        env={**os.environ, "OMP_NUM_THREADS": "1", "GPU_CORE_DEVICE": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "influence" in done.stderr and "100%" in done.stderr  # the progress bar
    result = json.loads(out.read_text())
    assert set(result) == {
        "eval_results",
        "influence",
        "training",
        "timings",
        "environment",
        "data",
        "artifacts",
    }
    # prompt/completion data stays raw under template auto, as before templates existed
    assert result["data"] == {
        "training_format": "prompt_completion",
        "eval_format": "prompt_completion",
        "template": "raw",
        "chat_template_sha256": None,
    }
    assert set(result["eval_results"]) == {"base", "few_shot", "finetuned"}
    assert len(result["influence"]["scores"]) == 8

    # Contract v2: scores.npy is the matrix (float32), and the manifest lists every file exactly.
    import hashlib

    import numpy as np

    matrix = np.load(artifacts / "scores.npy")
    assert matrix.dtype == np.float32 and matrix.shape == (8, 32) and matrix.flags.c_contiguous
    assert np.allclose(matrix, np.array(result["influence"]["scores"], dtype=np.float32))
    files = sorted(p.relative_to(artifacts).as_posix() for p in artifacts.rglob("*") if p.is_file())
    manifest = {entry["name"]: entry for entry in result["artifacts"]}
    assert sorted(manifest) == files
    assert {"scores.npy", "adapter/adapter_model.safetensors", "adapter/adapter_config.json"} <= set(files)
    for name, entry in manifest.items():
        data = (artifacts / name).read_bytes()
        assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert manifest["scores.npy"]["media_type"] == "application/x-npy"
    heatmap = result["influence"]["heatmap"]
    assert len(heatmap["eval_ids"]) == 8 and len(heatmap["train_ids"]) == 32

    # Each checkpoint's learning rate is the mean rate of its epoch's steps.
    index = json.loads((artifacts / "checkpoints" / "checkpoints.json").read_text())["checkpoints"]
    assert [entry["epoch"] for entry in index] == [1, 2, 3]
    curve = result["training"]["loss_curve"]
    for entry in index:
        rates = [p["learning_rate"] for p in curve if entry["epoch"] - 1 < p["epoch"] <= entry["epoch"]]
        assert entry["learning_rate"] == pytest.approx(sum(rates) / len(rates))
        assert (artifacts / "checkpoints" / entry["file"]).is_file()

    # The saved adapter reproduces the fine-tuned model's losses.
    from peft import PeftModel

    from gpu_core.data import encode_pair
    from gpu_core.evaluation import target_losses
    from gpu_core.runtime import load_model

    loaded = load_model("local/tiny-llama", device=torch.device("cpu"))
    model = PeftModel.from_pretrained(loaded.model, artifacts / "adapter")
    model.eval()
    pairs = [encode_pair(loaded.tokenizer, e["prompt"], e["expected"], 32) for e in spec["eval_data"]]
    losses = target_losses(model, pairs, loaded.tokenizer.pad_token_id, torch.device("cpu"))
    expected = [example["loss"] for example in result["eval_results"]["finetuned"]["examples"]]
    assert losses == pytest.approx(expected, rel=1e-5)


def test_bad_spec_exits_2_naming_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(
        json.dumps(
            {
                "training_data": [{"prompt": "a", "completion": "b"}],
                "eval_data": [{"prompt": "a", "expected": "b"}],
                "hyperparams": {"epochs": -2},
            }
        )
    )
    assert main(["run", str(spec_path), "--out", str(tmp_path / "r.json")]) == EXIT_BAD_SPEC
    error = capsys.readouterr().err
    assert "hyperparams.epochs" in error and "greater than or equal to 1" in error
    assert not (tmp_path / "r.json").exists()


def test_unreadable_spec_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec_path = tmp_path / "spec.json"
    spec_path.write_text("{not json")
    assert main(["run", str(spec_path), "--out", str(tmp_path / "r.json")]) == EXIT_BAD_SPEC
    assert "is not valid JSON" in capsys.readouterr().err


def test_data_files_and_a_saved_dataset_replace_the_specs_data(tmp_path: Path) -> None:
    import pyarrow as pa

    from gpu_core.cli import read_spec

    # A saved Hugging Face dataset (the layout Dataset.save_to_disk writes) of Alpaca rows.
    saved = tmp_path / "alpaca"
    saved.mkdir()
    table = pa.Table.from_pylist([{"instruction": "Color of lime?", "input": "", "output": "green"}])
    with pa.OSFile(str(saved / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    state = {"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}
    (saved / "state.json").write_text(json.dumps(state))
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps({"template": "chat", "hyperparams": {"epochs": 1}}))
    examples = Path(__file__).resolve().parents[2] / "examples"
    spec = read_spec(spec_path, saved, examples / "chat_eval.jsonl")
    assert spec.data_format.training == "alpaca" and spec.data_format.eval == "messages"
    assert spec.training_data[0].turns == [("user", "Color of lime?"), ("assistant", "green")]
    assert len(spec.eval_data) == 8 and spec.template == "chat"


def test_a_bad_data_file_exits_2_naming_the_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec_path, data = tmp_path / "spec.json", tmp_path / "train.jsonl"
    spec_path.write_text(json.dumps({"eval_data": [{"prompt": "a", "expected": "b"}]}))
    data.write_text('{"messages": [{"role": "user", "content": "q"}]}\n')
    args = ["run", str(spec_path), "--out", str(tmp_path / "r.json"), "--train", str(data)]
    assert main(args) == EXIT_BAD_SPEC
    error = capsys.readouterr().err
    assert 'train.jsonl: line 1: field "messages": the conversation has no assistant turn' in error
