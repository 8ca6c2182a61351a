"""Training and eval files as researchers have them, read into spec examples: the one parser.

The gateway (the dashboard's uploads) and the CLI both call :func:`parse_file` / :func:`read_path`.
Files: JSONL (or a JSON array), CSV with a header row, Parquet, and for the CLI a local Hugging
Face dataset directory (``Dataset.save_to_disk``: ``state.json`` and Arrow stream files, read
with pyarrow, without the ``datasets`` package). One format per file, detected from the first
row's fields:

- ``prompt_completion``: ``prompt`` and ``completion`` (training) or ``expected`` (eval);
- ``messages``: ``messages``, a list of ``{"role": system|user|assistant, "content": ...}``
  (in CSV and Parquet a JSON text is accepted); in eval files the final assistant turn is the
  expected answer;
- ``alpaca``: ``instruction``, optional ``input``, ``output`` and optional ``system``, read as
  the conversation system / user (instruction, a newline, input) / assistant (output).

Every row may carry an ``id``. Each problem names the line (JSONL, CSV) or row (Parquet,
datasets) and the field; every example is checked by the spec's own models
(:mod:`gpu_core.schemas`), so a file that passes here passes ``parse_spec``.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from gpu_core.schemas import DEFAULT_LIMITS, DataFormat, EvalExample, SpecLimits, TrainingExample

Kind = Literal["train", "eval"]
ANSWER_FIELD: dict[str, str] = {"train": "completion", "eval": "expected"}
FORMAT_LABELS: dict[str, str] = {
    "prompt_completion": "prompt / completion",
    "messages": "chat messages",
    "alpaca": "Alpaca (instruction / input / output)",
}
MAX_PROBLEMS = 20
_PARQUET_MAGIC = b"PAR1"


@dataclass(frozen=True)
class Problem:
    where: str  # "line 3", "row 7" or "file"
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass
class ParsedFile:
    """Spec-shaped examples (dicts), the detected format, and every problem (empty when valid)."""

    format: DataFormat | None
    examples: list[dict[str, Any]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


class DataFileError(ValueError):
    """A file that cannot be used; ``problems`` name the line or row and the field."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(str(p) for p in problems))


def _fields_of(kind: Kind) -> dict[DataFormat, tuple[set[str], set[str]]]:
    """Per format: (required fields, optional fields)."""
    return {
        "prompt_completion": ({"prompt", ANSWER_FIELD[kind]}, {"id"}),
        "messages": ({"messages"}, {"id"}),
        "alpaca": ({"instruction", "output"}, {"id", "input", "system"}),
    }


def detect_format(row: dict[str, Any]) -> DataFormat | None:
    if "messages" in row:
        return "messages"
    if "instruction" in row or "output" in row:
        return "alpaca"
    if "prompt" in row:
        return "prompt_completion"
    return None


# ---- rows from each kind of file ------------------------------------------------------------


def _jsonl_rows(text: str, problems: list[Problem]) -> list[tuple[str, Any]]:
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            problems.append(Problem(f"line {exc.lineno}", f"not valid JSON ({exc.msg})"))
            return []
        return [(f"item {i + 1}", item) for i, item in enumerate(items)]
    rows = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            rows.append((f"line {number}", json.loads(raw)))
        except json.JSONDecodeError as exc:
            problems.append(Problem(f"line {number}", f"not valid JSON ({exc.msg})"))
    return rows


def _csv_rows(text: str, problems: list[Problem]) -> list[tuple[str, Any]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [name.strip() for name in next(reader)]
    except StopIteration:
        return []
    except csv.Error as exc:
        problems.append(Problem("line 1", f"not valid CSV ({exc})"))
        return []
    rows = []
    start = reader.line_num + 1
    try:
        for values in reader:
            where = f"line {start}"
            start = reader.line_num + 1
            if not values or (len(values) == 1 and not values[0].strip()):
                continue
            if len(values) != len(header):
                problems.append(Problem(where, f"has {len(values)} fields; the header has {len(header)}"))
                continue
            rows.append(
                (where, {k: v for k, v in zip(header, values, strict=True) if not (k == "id" and v == "")})
            )
    except csv.Error as exc:
        problems.append(Problem(f"line {start}", f"not valid CSV ({exc})"))
    return rows


def _table_rows(table: Any) -> list[tuple[str, Any]]:
    return [(f"row {i + 1}", row) for i, row in enumerate(table.to_pylist())]


def _pyarrow(problems: list[Problem], what: str) -> bool:
    """pyarrow is the ``data`` extra (the gateway has it; a GPU worker need not)."""
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        problems.append(Problem("file", f"reading {what} needs pyarrow: pip install 'gpu-core[data]'"))
        return False
    return True


def _parquet_rows(data: bytes, problems: list[Problem]) -> list[tuple[str, Any]]:
    if not _pyarrow(problems, "Parquet"):
        return []
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return _table_rows(pq.read_table(pa.BufferReader(data)))
    except (pa.ArrowException, OSError) as exc:
        problems.append(Problem("file", f"not a readable Parquet file ({exc})"))
        return []


def _dataset_dir_rows(directory: Path, problems: list[Problem]) -> list[tuple[str, Any]]:
    """A ``save_to_disk`` directory of one Dataset: its Arrow stream files in ``state.json`` order."""
    if not _pyarrow(problems, "a saved dataset"):
        return []
    import pyarrow as pa

    if (directory / "dataset_dict.json").is_file():
        splits = json.loads((directory / "dataset_dict.json").read_text()).get("splits", [])
        problems.append(
            Problem("file", f"{directory} holds the splits {', '.join(splits)}; give one split's directory")
        )
        return []
    state_file = directory / "state.json"
    if not state_file.is_file():
        problems.append(Problem("file", f"{directory} is not a saved Hugging Face dataset (no state.json)"))
        return []
    files = [entry["filename"] for entry in json.loads(state_file.read_text()).get("_data_files", [])]
    tables = []
    for name in files:
        with pa.memory_map(str(directory / name)) as source:
            tables.append(pa.ipc.open_stream(source).read_all())
    if not tables:
        return []
    return _table_rows(pa.concat_tables(tables))


# ---- rows into spec examples ----------------------------------------------------------------


def _as_messages(value: Any) -> Any:
    """CSV and Parquet cells may hold the conversation as JSON text."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _alpaca(row: dict[str, Any]) -> tuple[dict[str, Any] | None, list[str], list[Problem]]:
    problems = []
    for name in ("instruction", "input", "output", "system"):
        value = row.get(name)
        if value is not None and not isinstance(value, str):
            problems.append(Problem("", f'field "{name}" must be text, not {type(value).__name__}'))
    if problems:
        return None, [], problems
    user = row["instruction"] + (f"\n{row['input']}" if row.get("input") else "")
    turns = [("system", "system")] if row.get("system") else []
    turns += [("user", "instruction"), ("assistant", "output")]
    contents = {"system": row.get("system"), "user": user, "assistant": row["output"]}
    messages = [{"role": role, "content": contents[role]} for role, _ in turns]
    return {"messages": messages}, [source for _, source in turns], []


def _field_name(loc: tuple[Any, ...], sources: list[str]) -> str:
    if len(loc) >= 3 and loc[0] == "messages" and isinstance(loc[1], int) and sources:
        return sources[loc[1]]  # an alpaca column
    name = ""
    for part in loc:
        name += f"[{part}]" if isinstance(part, int) else ("." if name else "") + str(part)
    return name


def _example(
    kind: Kind, fmt: DataFormat, row: dict[str, Any], limits: SpecLimits
) -> tuple[dict[str, Any] | None, list[Problem]]:
    required, optional = _fields_of(kind)[fmt]
    problems = [
        Problem(
            "",
            f'unknown field "{name}" for the {FORMAT_LABELS[fmt]} format '
            f"(allowed: {', '.join(sorted(required | optional))})",
        )
        for name in row
        if name not in required | optional
    ]
    problems += [
        Problem("", f'field "{name}" is missing') for name in sorted(required) if row.get(name) is None
    ]
    if problems:
        return None, problems
    sources: list[str] = []
    if fmt == "alpaca":
        example, sources, problems = _alpaca(row)
        if example is None:
            return None, problems
    elif fmt == "messages":
        example = {"messages": _as_messages(row["messages"])}
    else:
        example = {"prompt": row["prompt"], ANSWER_FIELD[kind]: row[ANSWER_FIELD[kind]]}
    if row.get("id") is not None:
        example["id"] = row["id"] if isinstance(row["id"], str) else str(row["id"])
    model = TrainingExample if kind == "train" else EvalExample
    try:
        model.model_validate(example, context={"limits": limits})
    except ValidationError as exc:
        for error in exc.errors(include_input=False, include_url=False):
            message = str(error["msg"]).removeprefix("Value error, ")
            loc = tuple(error["loc"])
            if (
                loc
                and error["type"] == "string_too_short"
                and (error.get("ctx") or {}).get("min_length") == 1
            ):
                problems.append(Problem("", f'field "{_field_name(loc, sources)}" is empty'))
            elif loc:
                problems.append(Problem("", f'field "{_field_name(loc, sources)}": {message}'))
            else:  # the example's own checks name the field first: "messages[2].role: ..."
                name, _, rest = message.partition(": ")
                turn = re.match(r"messages\[(\d+)\]", name)
                if turn and sources:
                    name = sources[int(turn.group(1))]
                problems.append(Problem("", f'field "{name}": {rest}' if rest else message))
        return None, problems
    return example, []


def examples_from_rows(
    kind: Kind, rows: list[tuple[str, Any]], problems: list[Problem], limits: SpecLimits
) -> ParsedFile:
    parsed = ParsedFile(format=None, problems=problems)
    first_at = ""
    ids: dict[str, str] = {}
    for where, row in rows:
        if not isinstance(row, dict):
            kind_of = "an array" if isinstance(row, list) else type(row).__name__
            parsed.problems.append(Problem(where, f"must be an object with fields, not {kind_of}"))
            continue
        fmt = detect_format(row)
        if fmt is None:
            answer = ANSWER_FIELD[kind]
            parsed.problems.append(
                Problem(
                    where,
                    f'no "prompt"/"{answer}", "messages" or "instruction"/"output" fields '
                    f"(found: {', '.join(row) or 'none'})",
                )
            )
            continue
        if parsed.format is None:
            parsed.format, first_at = fmt, where
        elif fmt != parsed.format:
            parsed.problems.append(
                Problem(
                    where,
                    f"is {FORMAT_LABELS[fmt]} but {first_at} is {FORMAT_LABELS[parsed.format]}; "
                    "a file holds one format",
                )
            )
            continue
        example, row_problems = _example(kind, fmt, row, limits)
        parsed.problems += [Problem(where, p.message) for p in row_problems]
        row_id = row.get("id")
        if row_id is not None and str(row_id) in ids:
            parsed.problems.append(
                Problem(where, f'field "id" repeats "{row_id}" (first on {ids[str(row_id)]})')
            )
        elif row_id is not None:
            ids[str(row_id)] = where
        if example is not None:
            parsed.examples.append(example)
    if not rows and not parsed.problems:
        label = "training" if kind == "train" else "eval"
        parsed.problems.append(Problem("file", f"has no {label} examples"))
    limit = limits.max_train_examples if kind == "train" else limits.max_eval_examples
    if len(rows) > limit:
        parsed.problems.append(Problem("file", f"has {len(rows)} examples; the limit is {limit}"))
    parsed.problems.sort(key=_position)
    return parsed


def _position(problem: Problem) -> int:
    match = re.search(r"\d+", problem.where)
    return int(match.group()) if match else 0


def parse_file(kind: Kind, filename: str, data: bytes, limits: SpecLimits = DEFAULT_LIMITS) -> ParsedFile:
    """Read an uploaded file; the type comes from the name (``.csv``, ``.parquet``, else JSONL)."""
    problems: list[Problem] = []
    if filename.lower().endswith(".parquet") or data[:4] == _PARQUET_MAGIC:
        rows = _parquet_rows(data, problems)
    else:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            return ParsedFile(
                format=None, problems=[Problem("file", f"is not UTF-8 text (byte {exc.start})")]
            )
        rows = _csv_rows(text, problems) if filename.lower().endswith(".csv") else _jsonl_rows(text, problems)
    return examples_from_rows(kind, rows, problems, limits)


def read_path(kind: Kind, path: Path, limits: SpecLimits = DEFAULT_LIMITS) -> ParsedFile:
    """A file, or a ``save_to_disk`` dataset directory (the CLI)."""
    if path.is_dir():
        problems: list[Problem] = []
        return examples_from_rows(kind, _dataset_dir_rows(path, problems), problems, limits)
    return parse_file(kind, path.name, path.read_bytes(), limits)


def read_examples(
    kind: Kind, path: Path, limits: SpecLimits = DEFAULT_LIMITS
) -> tuple[DataFormat, list[dict[str, Any]]]:
    """Like :func:`read_path`, raising :class:`DataFileError` (at most ``MAX_PROBLEMS``) when invalid."""
    parsed = read_path(kind, path, limits)
    if parsed.problems or parsed.format is None:
        shown = parsed.problems[:MAX_PROBLEMS]
        if len(parsed.problems) > MAX_PROBLEMS:
            shown.append(Problem("file", f"and {len(parsed.problems) - MAX_PROBLEMS} more problems"))
        raise DataFileError(str(path), shown)
    return parsed.format, parsed.examples
