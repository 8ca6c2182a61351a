"""Stored datasets on the worker's side and the row-at-a-time reader behind them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gpu_core.datasets import DatasetError, DatasetFile, parse_dataset_files, read_datasets
from gpu_core.formats import FileScan, parse_file, stream_path
from gpu_core.schemas import SpecLimits, parse_spec

ROWS = [{"id": f"r{i}", "prompt": f"What is {i}?", "completion": f" {i}"} for i in range(30)]


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def scan_of(path: Path, kind: str = "train", limits: SpecLimits | None = None) -> tuple[FileScan, list]:
    scan = FileScan()
    examples = list(stream_path(kind, path, scan, limits or SpecLimits(max_train_examples=1000)))  # type: ignore[arg-type]
    return scan, examples


def test_every_format_streams_to_the_examples_the_whole_file_parser_reads(tmp_path: Path) -> None:
    files = {"d.jsonl": jsonl(ROWS), "d.json": json.dumps(ROWS).encode()}
    csv_text = "id,prompt,completion\n" + "".join(
        f'{r["id"]},"{r["prompt"]}",{r["completion"]}\n' for r in ROWS
    )
    files["d.csv"] = csv_text.encode()
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    files["d.parquet"] = (tmp_path / "d.parquet").read_bytes()
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        scan, examples = scan_of(tmp_path / name)
        whole = parse_file("train", name, data, SpecLimits(max_train_examples=1000))
        assert (scan.format, scan.count, scan.problems) == ("prompt_completion", 30, []), name
        assert examples == whole.examples, name
        assert scan.text_chars == sum(len(r["prompt"]) + len(r["completion"]) for r in ROWS)
        assert scan.answer_chars == sum(len(r["completion"]) for r in ROWS)


def test_problems_name_the_line_and_a_repeated_id_and_the_limit(tmp_path: Path) -> None:
    rows = [*ROWS[:3], {"id": "r1", "prompt": "again", "completion": "x"}, {"prompt": "no answer"}]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(jsonl(rows) + b"{not json\n")
    scan, _ = scan_of(path)
    assert [str(p) for p in scan.problems] == [
        'line 5: field "completion" is missing',
        "line 6: not valid JSON (Expecting property name enclosed in double quotes)",
        'line 4: field "id" repeats the id on line 2',
    ]
    (tmp_path / "many.jsonl").write_bytes(jsonl(ROWS))
    scan, _ = scan_of(tmp_path / "many.jsonl", limits=SpecLimits(max_train_examples=20))
    assert scan.over_budget
    assert [str(p) for p in scan.problems] == ["file: has more than 20 examples; the limit is 20"]


def stored_spec(data: bytes, filename: str = "data.jsonl") -> dict:
    raw = {
        "training_dataset_id": "ds_" + "a" * 32,
        "training_dataset": {
            "id": "ds_" + "a" * 32,
            "format": "prompt_completion",
            "count": 30,
            "text_chars": 1,
            "answer_chars": 1,
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
            "filename": filename,
        },
        "eval_data": [{"prompt": "q", "expected": "a"}],
    }
    return parse_spec(raw).model_dump(mode="json")


def test_a_worker_reads_a_stored_dataset_into_the_spec_and_refuses_a_changed_object(tmp_path: Path) -> None:
    data = jsonl(ROWS)
    stored = tmp_path / "store" / "data.jsonl"
    stored.parent.mkdir()
    stored.write_bytes(data)
    spec = stored_spec(data)
    assert parse_spec(spec).n_train == 30 and "training_data" not in spec
    files = parse_dataset_files(
        [
            {
                "role": "train",
                "url": stored.as_uri(),
                "sha256": spec["training_dataset"]["sha256"],
                "bytes": len(data),
                "filename": "data.jsonl",
            }
        ]
    )
    resolved = parse_spec(read_datasets(spec, files, tmp_path / "work"))
    assert [e.id for e in resolved.training_data] == [r["id"] for r in ROWS]
    assert resolved.training_dataset_id is None and not list((tmp_path / "work").iterdir())

    # Same size, other bytes: the sha256 refuses it before any row is read.
    stored.write_bytes(data.replace(b"What", b"Whom"))
    with pytest.raises(DatasetError, match="the stored object was changed; refusing it"):
        read_datasets(spec, files, tmp_path / "work")
    stored.unlink()
    with pytest.raises(DatasetError, match=r"could not be read from the artifact store \(HTTP 404\)"):
        read_datasets(spec, files, tmp_path / "work")
    # A URL for another object than the spec recorded is refused without a read.
    other = [DatasetFile("train", stored.as_uri(), "0" * 64, len(data), "data.jsonl")]
    with pytest.raises(DatasetError, match="not for the upload the spec recorded"):
        read_datasets(spec, other, tmp_path / "work")
