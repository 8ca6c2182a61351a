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

Every file is read within a :class:`ReadBudget`, because a small upload can expand far past
its size (a Parquet of two million rows fits in 13 KB; a dictionary-encoded column repeats one
1 MB string from 700 bytes; a JSON text can nest 200,000 deep). Parquet metadata (rows,
columns, uncompressed size) is checked before any row is read, rows are read in small batches
whose decoded size is counted, JSON is scanned for its depth and value count before it is
parsed, and reading stops at the first row past the example limit. Over the budget the file
is refused with one problem naming the limit.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from array import array
from collections.abc import Iterable, Iterator
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
# Rows per Parquet / Arrow batch: small, so one batch of oversized cells stays within the budget.
_BATCH_ROWS = 16


@dataclass(frozen=True)
class ReadBudget:
    """What reading one file may cost, beyond the example limits of :class:`SpecLimits`."""

    max_decoded_bytes: int = 32 * 1024 * 1024  # the file's size, and its rows once decoded
    max_depth: int = 64  # JSON nesting (a chat example needs 4)
    max_json_values: int = 2_000_000  # containers and separators, before a JSON text is parsed
    max_columns: int = 32  # the formats use at most 5


DEFAULT_BUDGET = ReadBudget()


class _OverBudget(Exception):
    """Reading stopped: the file is over a limit, which the message names."""


class _TooDeep(_OverBudget):
    """JSON nested past the budget's depth: a malformed file rather than a too large one."""


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
    # Too large to read: over the ReadBudget or the example count (its one problem says which).
    over_budget: bool = False


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


_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_STRUCTURE = re.compile(r"[^\[\]{},:]+")
_DEPTH_STEP = str.maketrans({"[": "\x01", "{": "\x01", "]": "\x02", "}": "\x02"})


def _check_json(text: str, budget: ReadBudget, what: str) -> None:
    """Depth and value count of a JSON text, by a linear scan outside its strings, so that
    ``json.loads`` never recurses past ``max_depth`` nor builds more than ``max_json_values``."""
    structure = _STRUCTURE.sub("", _JSON_STRING.sub("", text))
    if len(structure) > budget.max_json_values:
        limit = f"{budget.max_json_values:,}"
        raise _OverBudget(f"{what} has more than {limit} JSON values; the limit is {limit}")
    brackets = structure.replace(",", "").replace(":", "")
    if len(brackets) <= budget.max_depth:
        return
    depth = 0
    # Only texts with many brackets get here; the loop runs over brackets alone.
    for step in brackets.translate(_DEPTH_STEP):
        depth = depth + 1 if step == "\x01" else max(depth - 1, 0)
        if depth > budget.max_depth:
            raise _TooDeep(
                f"{what} is nested more than {budget.max_depth} deep; the limit is {budget.max_depth}"
            )


def _loads(text: str, budget: ReadBudget, what: str) -> Any:
    _check_json(text, budget, what)
    return json.loads(text)


def _jsonl_rows(
    text: str, problems: list[Problem], budget: ReadBudget, max_rows: int
) -> list[tuple[str, Any]]:
    _check_json(text, budget, "the file")
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            problems.append(Problem(f"line {exc.lineno}", f"not valid JSON ({exc.msg})"))
            return []
        if isinstance(items, list) and len(items) > max_rows:
            raise _OverBudget(f"has {len(items):,} examples; the limit is {max_rows:,}")
        return [(f"item {i + 1}", item) for i, item in enumerate(items)]
    rows: list[tuple[str, Any]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        if len(rows) == max_rows:
            raise _OverBudget(f"has more than {max_rows:,} examples; the limit is {max_rows:,}")
        try:
            rows.append((f"line {number}", json.loads(raw)))
        except json.JSONDecodeError as exc:
            problems.append(Problem(f"line {number}", f"not valid JSON ({exc.msg})"))
    return rows


def _csv_rows(text: str, problems: list[Problem], budget: ReadBudget, max_rows: int) -> list[tuple[str, Any]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [name.strip() for name in next(reader)]
        if len(header) > budget.max_columns:
            raise _OverBudget(f"has {len(header):,} columns; the limit is {budget.max_columns}")
    except StopIteration:
        return []
    except csv.Error as exc:
        problems.append(Problem("line 1", f"not valid CSV ({exc})"))
        return []
    rows: list[tuple[str, Any]] = []
    start = reader.line_num + 1
    try:
        for values in reader:
            where = f"line {start}"
            start = reader.line_num + 1
            if not values or (len(values) == 1 and not values[0].strip()):
                continue
            if len(rows) == max_rows:
                raise _OverBudget(f"has more than {max_rows:,} examples; the limit is {max_rows:,}")
            if len(values) != len(header):
                problems.append(Problem(where, f"has {len(values)} fields; the header has {len(header)}"))
                continue
            rows.append(
                (where, {k: v for k, v in zip(header, values, strict=True) if not (k == "id" and v == "")})
            )
    except csv.Error as exc:
        problems.append(Problem(f"line {start}", f"not valid CSV ({exc})"))
    return rows


def _batch_rows(batches: Iterable[Any], budget: ReadBudget, max_rows: int) -> list[tuple[str, Any]]:
    """Rows of Arrow record batches, counting rows and decoded bytes before each batch becomes
    Python objects."""
    rows: list[tuple[str, Any]] = []
    decoded = 0
    for batch in batches:
        if len(rows) + batch.num_rows > max_rows:
            raise _OverBudget(f"has more than {max_rows:,} examples; the limit is {max_rows:,}")
        decoded += sum(_decoded_bytes(column) for column in batch.columns)
        if decoded > budget.max_decoded_bytes:
            limit = _mib(budget.max_decoded_bytes)
            raise _OverBudget(f"decodes to more than {limit}; the limit is {limit}")
        rows += [(f"row {len(rows) + i + 1}", row) for i, row in enumerate(batch.to_pylist())]
    return rows


def _decoded_bytes(column: Any) -> int:
    """A column's size once every value is written out: a dictionary repeats its values, in
    nested lists and structs (a conversation's turns) too."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(column, pa.DictionaryArray):
        dictionary: Any = column.dictionary  # strings or bytes: BYTE_ARRAY columns only
        lengths = pc.binary_length(dictionary).take(column.indices)
        return int(pc.sum(lengths).as_py() or 0) + column.indices.nbytes
    if isinstance(column, pa.ListArray | pa.LargeListArray):
        return _decoded_bytes(column.flatten()) + column.offsets.nbytes
    if isinstance(column, pa.StructArray):
        return sum(_decoded_bytes(field) for field in column.flatten())
    return int(column.nbytes)


def _mib(size: int) -> str:
    return f"{size / (1024 * 1024):g} MiB"


def _check_columns(schema: Any, budget: ReadBudget) -> None:
    if len(schema.names) > budget.max_columns:
        raise _OverBudget(f"has {len(schema.names):,} columns; the limit is {budget.max_columns}")


def _pyarrow(problems: list[Problem], what: str) -> bool:
    """pyarrow is the ``data`` extra (the gateway has it; a GPU worker need not)."""
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        problems.append(Problem("file", f"reading {what} needs pyarrow: pip install 'gpu-core[data]'"))
        return False
    return True


def _parquet_rows(
    data: bytes, problems: list[Problem], budget: ReadBudget, max_rows: int
) -> list[tuple[str, Any]]:
    if not _pyarrow(problems, "Parquet"):
        return []
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        # Text columns stay dictionary-encoded while read: a repeated value is decoded once, and
        # _decoded_bytes counts what writing out every row would cost before it happens.
        schema = pq.read_schema(pa.BufferReader(data))
        text_columns = [
            f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)
        ]
        parquet = pq.ParquetFile(pa.BufferReader(data), read_dictionary=text_columns)
        metadata = parquet.metadata
        # The footer's figures, before any page is decompressed.
        if metadata.num_rows > max_rows:
            raise _OverBudget(f"has {metadata.num_rows:,} rows; the limit is {max_rows:,} examples")
        _check_columns(parquet.schema_arrow, budget)
        uncompressed = sum(metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups))
        if uncompressed > budget.max_decoded_bytes:
            raise _OverBudget(
                f"is {_mib(uncompressed)} uncompressed; the limit is {_mib(budget.max_decoded_bytes)}"
            )
        # Dictionary pages repeat a value without storing it again: the decoded batches count.
        return _batch_rows(parquet.iter_batches(batch_size=_BATCH_ROWS), budget, max_rows)
    except (pa.ArrowException, OSError) as exc:
        problems.append(Problem("file", f"not a readable Parquet file ({exc})"))
        return []


def _dataset_dir_rows(
    directory: Path, problems: list[Problem], budget: ReadBudget, max_rows: int
) -> list[tuple[str, Any]]:
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
    size = sum((directory / name).stat().st_size for name in files)
    if size > budget.max_decoded_bytes:
        raise _OverBudget(f"is {_mib(size)}; the limit is {_mib(budget.max_decoded_bytes)}")

    def batches() -> Iterator[Any]:
        for name in files:
            with pa.memory_map(str(directory / name)) as source:
                stream = pa.ipc.open_stream(source)
                _check_columns(stream.schema, budget)
                yield from stream

    return _batch_rows(batches(), budget, max_rows)


# ---- rows into spec examples ----------------------------------------------------------------


def _as_messages(value: Any, budget: ReadBudget) -> Any:
    """CSV and Parquet cells may hold the conversation as JSON text."""
    if isinstance(value, str):
        try:
            return _loads(value, budget, 'field "messages"')
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
    kind: Kind, fmt: DataFormat, row: dict[str, Any], limits: SpecLimits, budget: ReadBudget
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
        try:
            example = {"messages": _as_messages(row["messages"], budget)}
        except _OverBudget as exc:
            return None, [Problem("", str(exc))]
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
    kind: Kind,
    rows: list[tuple[str, Any]],
    problems: list[Problem],
    limits: SpecLimits,
    budget: ReadBudget = DEFAULT_BUDGET,
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
        example, row_problems = _example(kind, fmt, row, limits, budget)
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
    parsed.problems.sort(key=_position)
    return parsed


def _position(problem: Problem) -> int:
    match = re.search(r"\d+", problem.where)
    return int(match.group()) if match else 0


def parse_file(
    kind: Kind,
    filename: str,
    data: bytes,
    limits: SpecLimits = DEFAULT_LIMITS,
    budget: ReadBudget = DEFAULT_BUDGET,
) -> ParsedFile:
    """Read an uploaded file; the type comes from the name (``.csv``, ``.parquet``, else JSONL)."""
    problems: list[Problem] = []
    max_rows = _max_rows(kind, limits)
    try:
        if len(data) > budget.max_decoded_bytes:
            raise _OverBudget(f"is {_mib(len(data))}; the limit is {_mib(budget.max_decoded_bytes)}")
        if filename.lower().endswith(".parquet") or data[:4] == _PARQUET_MAGIC:
            rows = _parquet_rows(data, problems, budget, max_rows)
        else:
            try:
                text = data.decode("utf-8-sig")
            except UnicodeDecodeError as exc:
                return ParsedFile(
                    format=None, problems=[Problem("file", f"is not UTF-8 text (byte {exc.start})")]
                )
            if filename.lower().endswith(".csv"):
                rows = _csv_rows(text, problems, budget, max_rows)
            else:
                rows = _jsonl_rows(text, problems, budget, max_rows)
    except _OverBudget as exc:
        return ParsedFile(
            format=None, problems=[Problem("file", str(exc))], over_budget=not isinstance(exc, _TooDeep)
        )
    return examples_from_rows(kind, rows, problems, limits, budget)


def _max_rows(kind: Kind, limits: SpecLimits) -> int:
    return limits.max_train_examples if kind == "train" else limits.max_eval_examples


def read_path(
    kind: Kind, path: Path, limits: SpecLimits = DEFAULT_LIMITS, budget: ReadBudget = DEFAULT_BUDGET
) -> ParsedFile:
    """A file, or a ``save_to_disk`` dataset directory (the CLI)."""
    if path.is_dir():
        problems: list[Problem] = []
        try:
            rows = _dataset_dir_rows(path, problems, budget, _max_rows(kind, limits))
        except _OverBudget as exc:
            return ParsedFile(format=None, problems=[Problem("file", str(exc))], over_budget=True)
        return examples_from_rows(kind, rows, problems, limits, budget)
    size = path.stat().st_size
    if size > budget.max_decoded_bytes:
        message = f"is {_mib(size)}; the limit is {_mib(budget.max_decoded_bytes)}"
        return ParsedFile(format=None, problems=[Problem("file", message)], over_budget=True)
    return parse_file(kind, path.name, path.read_bytes(), limits, budget)


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


def examples_to_parquet(rows: list[dict[str, Any]]) -> bytes:
    """Spec examples as they serialise (``id`` and prompt/completion, or ``id`` and ``messages``)
    as a Parquet file that :func:`parse_file` reads back to the same examples: conversations as
    a list of ``{role, content}`` structs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = list(dict.fromkeys(name for row in rows for name in row)) or ["id", "prompt", "completion"]
    if "messages" in columns:
        message = pa.struct([("role", pa.string()), ("content", pa.string())])
        types = {"messages": pa.list_(message)}
    else:
        types = {}
    schema = pa.schema([(name, types.get(name, pa.string())) for name in columns])
    table = pa.Table.from_pylist(rows, schema=schema)
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


# ---- stored datasets: one row at a time ----------------------------------------------------


@dataclass
class FileScan:
    """What :func:`stream_path` found, filled in as it reads: the format, the examples' count
    and sizes, and the problems (the first ``MAX_PROBLEMS``; ``more_problems`` counts the rest)."""

    format: DataFormat | None = None
    count: int = 0
    text_chars: int = 0  # every turn's text, summed (the cost model's token estimate)
    answer_chars: int = 0  # the assistant's turns, summed
    problems: list[Problem] = field(default_factory=list)
    more_problems: int = 0
    over_budget: bool = False

    def add(self, problem: Problem) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(problem)
        else:
            self.more_problems += 1

    @property
    def shown_problems(self) -> list[Problem]:
        more = [Problem("file", f"and {self.more_problems} more problems")] if self.more_problems else []
        return [*self.problems, *more]


def stream_path(
    kind: Kind,
    path: Path,
    scan: FileScan,
    limits: SpecLimits = DEFAULT_LIMITS,
    budget: ReadBudget = DEFAULT_BUDGET,
    filename: str | None = None,
) -> Iterator[dict[str, Any]]:
    """The examples of a file on disk, one at a time, each checked as :func:`parse_file` checks
    it: what a stored dataset of a million rows is read with, at upload (counted) and in the
    worker. Memory is one row (one small batch for Parquet) plus 12 bytes per example for the
    duplicate-id check; ``budget`` bounds each row (``max_decoded_bytes`` per row or batch, not
    per file), ``limits`` the number of examples. ``filename`` (default: the path's) decides
    CSV / Parquet / JSONL. Problems and sizes land in ``scan``; stop using the examples when it
    has problems."""
    name = (filename or path.name).lower()
    max_rows = _max_rows(kind, limits)
    ids = _IdTracker()
    try:
        with path.open("rb") as handle:
            head = handle.read(4)
        if name.endswith(".parquet") or head == _PARQUET_MAGIC:
            rows = _parquet_path_rows(path, scan, budget, max_rows)
        elif name.endswith(".csv"):
            rows = _csv_path_rows(path, scan, budget, max_rows)
        else:
            rows = _jsonl_path_rows(path, scan, budget, max_rows)
        first_at = ""
        for where, row in rows:
            if not isinstance(row, dict):
                kind_of = "an array" if isinstance(row, list) else type(row).__name__
                scan.add(Problem(where, f"must be an object with fields, not {kind_of}"))
                continue
            fmt = detect_format(row)
            if fmt is None:
                scan.add(
                    Problem(
                        where,
                        f'no "prompt"/"{ANSWER_FIELD[kind]}", "messages" or "instruction"/"output" '
                        f"fields (found: {', '.join(row) or 'none'})",
                    )
                )
                continue
            if scan.format is None:
                scan.format, first_at = fmt, where
            elif fmt != scan.format:
                scan.add(
                    Problem(
                        where,
                        f"is {FORMAT_LABELS[fmt]} but {first_at} is {FORMAT_LABELS[scan.format]}; "
                        "a file holds one format",
                    )
                )
                continue
            example, row_problems = _example(kind, fmt, row, limits, budget)
            for problem in row_problems:
                scan.add(Problem(where, problem.message))
            if example is None:
                continue
            ids.add(example.get("id"), where)
            scan.count += 1
            text_chars, answer_chars = _turn_chars(example, kind)
            scan.text_chars += text_chars
            scan.answer_chars += answer_chars
            yield example
    except _OverBudget as exc:
        scan.over_budget = not isinstance(exc, _TooDeep)
        scan.problems = [Problem("file", str(exc))]
        scan.more_problems = 0
        return
    except UnicodeDecodeError as exc:
        scan.add(Problem("file", f"is not UTF-8 text (byte {exc.start})"))
        return
    for problem in ids.repeats():
        scan.add(problem)
    if scan.count == 0 and not scan.problems:
        scan.add(Problem("file", f"has no {'training' if kind == 'train' else 'eval'} examples"))


class _IdTracker:
    """Repeated example ids among up to millions of rows: an 8-byte digest and a line (or row)
    number per id, compared once at the end (a set of the ids themselves would hold every string)."""

    def __init__(self) -> None:
        self._digests = array("q")
        self._numbers = array("q")
        self._prefix = "line"

    def add(self, value: Any, where: str) -> None:
        if value is None:
            return
        digest = hashlib.blake2b(str(value).encode(), digest_size=8).digest()
        self._digests.append(int.from_bytes(digest, "little", signed=True))
        prefix, _, number = where.partition(" ")
        self._prefix = prefix
        self._numbers.append(int(number))

    def repeats(self) -> list[Problem]:
        if len(self._digests) < 2:
            return []
        import numpy as np

        digests = np.frombuffer(self._digests, dtype=np.int64)
        order = np.argsort(digests, kind="stable")
        ordered = digests[order]
        same = np.flatnonzero(ordered[1:] == ordered[:-1])
        return [
            Problem(
                f"{self._prefix} {self._numbers[order[i + 1]]}",
                f'field "id" repeats the id on {self._prefix} {self._numbers[order[i]]}',
            )
            for i in same[:MAX_PROBLEMS]
        ]


def _turn_chars(example: dict[str, Any], kind: Kind) -> tuple[int, int]:
    """(every turn's characters, the assistant's) of a checked example."""
    if "messages" in example:
        turns = [(m["role"], m["content"]) for m in example["messages"]]
    else:
        turns = [("user", example["prompt"]), ("assistant", example[ANSWER_FIELD[kind]])]
    return sum(len(c) for _, c in turns), sum(len(c) for role, c in turns if role == "assistant")


def _row_lines(path: Path, budget: ReadBudget) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of a text file, refusing a line longer than one row may be."""
    with path.open("rb") as handle:
        for number, line in enumerate(iter(lambda: handle.readline(budget.max_decoded_bytes + 1), b""), 1):
            if len(line) > budget.max_decoded_bytes:
                limit = _mib(budget.max_decoded_bytes)
                raise _OverBudget(f"line {number} is longer than {limit}; the limit is {limit} per row")
            yield number, line


def _jsonl_path_rows(
    path: Path, scan: FileScan, budget: ReadBudget, max_rows: int
) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as handle:
        start = handle.read(64).decode("utf-8-sig", errors="replace").lstrip()
    if start.startswith("["):
        # A JSON array is one value: read whole, so only within the one-file budget.
        if path.stat().st_size > budget.max_decoded_bytes:
            limit = _mib(budget.max_decoded_bytes)
            raise _OverBudget(
                f"is a JSON array over {limit} (the limit for one); give JSONL, one example a line"
            )
        problems: list[Problem] = []
        yield from _jsonl_rows(path.read_bytes().decode("utf-8-sig"), problems, budget, max_rows)
        for problem in problems:
            scan.add(problem)
        return
    rows = 0
    for number, raw in _row_lines(path, budget):
        text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        if not text.strip():
            continue
        if rows == max_rows:
            raise _OverBudget(f"has more than {max_rows:,} examples; the limit is {max_rows:,}")
        rows += 1
        try:
            _check_json(text, budget, f"line {number}")
            yield f"line {number}", json.loads(text)
        except _TooDeep as exc:
            scan.add(Problem(f"line {number}", str(exc)))
        except json.JSONDecodeError as exc:
            scan.add(Problem(f"line {number}", f"not valid JSON ({exc.msg})"))


def _csv_path_rows(
    path: Path, scan: FileScan, budget: ReadBudget, max_rows: int
) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle)
        try:
            header = [name.strip() for name in next(reader)]
        except StopIteration:
            return
        except csv.Error as exc:
            scan.add(Problem("line 1", f"not valid CSV ({exc})"))
            return
        if len(header) > budget.max_columns:
            raise _OverBudget(f"has {len(header):,} columns; the limit is {budget.max_columns}")
        rows, start = 0, reader.line_num + 1
        try:
            for values in reader:
                where, start = f"line {start}", reader.line_num + 1
                if not values or (len(values) == 1 and not values[0].strip()):
                    continue
                if rows == max_rows:
                    raise _OverBudget(f"has more than {max_rows:,} examples; the limit is {max_rows:,}")
                rows += 1
                if len(values) != len(header):
                    scan.add(Problem(where, f"has {len(values)} fields; the header has {len(header)}"))
                    continue
                yield (
                    where,
                    {k: v for k, v in zip(header, values, strict=True) if not (k == "id" and v == "")},
                )
        except csv.Error as exc:
            scan.add(Problem(f"line {start}", f"not valid CSV ({exc})"))


def _parquet_path_rows(
    path: Path, scan: FileScan, budget: ReadBudget, max_rows: int
) -> Iterator[tuple[str, Any]]:
    problems: list[Problem] = []
    if not _pyarrow(problems, "Parquet"):
        scan.problems += problems
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(str(path))
        text_columns = [
            f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)
        ]
        parquet = pq.ParquetFile(str(path), read_dictionary=text_columns)
        if parquet.metadata.num_rows > max_rows:
            raise _OverBudget(f"has {parquet.metadata.num_rows:,} rows; the limit is {max_rows:,} examples")
        _check_columns(parquet.schema_arrow, budget)
        done = 0
        for batch in parquet.iter_batches(batch_size=_BATCH_ROWS):
            # Each batch, not the file, is held at once: the budget bounds one batch.
            decoded = sum(_decoded_bytes(column) for column in batch.columns)
            if decoded > budget.max_decoded_bytes:
                limit = _mib(budget.max_decoded_bytes)
                raise _OverBudget(f"rows {done + 1}-{done + batch.num_rows} decode to more than {limit}")
            for i, row in enumerate(batch.to_pylist()):
                yield f"row {done + i + 1}", row
            done += batch.num_rows
    except (pa.ArrowException, OSError) as exc:
        scan.add(Problem("file", f"not a readable Parquet file ({exc})"))
