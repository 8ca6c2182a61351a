"""Data files (JSONL, CSV, Parquet, saved datasets; prompt/completion, messages, Alpaca), chat
templates in the encoding, and the pre-submit data report, on the tiny model's tokenizer."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gpu_core.data import IGNORE_INDEX, Encoder, TemplateError, resolve_template
from gpu_core.datareport import data_report
from gpu_core.formats import (
    DataFileError,
    ReadBudget,
    examples_to_parquet,
    parse_file,
    read_examples,
    read_path,
)
from gpu_core.schemas import SpecError, SpecLimits, TrainingExample, parse_spec
from gpu_core.tiny import build_tokenizer

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SYSTEM = {"role": "system", "content": "Be brief."}
MULTI_TURN = [
    SYSTEM,
    {"role": "user", "content": "Color of apple?"},
    {"role": "assistant", "content": "red"},
    {"role": "user", "content": "And lime?"},
    {"role": "assistant", "content": "green"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def jsonl(*rows: object) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def chat_ids(tokenizer, messages, **kwargs) -> list[int]:
    answer = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(answer["input_ids"] if hasattr(answer, "keys") else answer)


# ---- chat template encoding -------------------------------------------------------------------


def test_templated_chat_ids_equal_apply_chat_template(tokenizer) -> None:
    pair = Encoder(tokenizer, "chat", 1024).encode([(m["role"], m["content"]) for m in MULTI_TURN])
    assert pair.input_ids == chat_ids(tokenizer, MULTI_TURN)
    assert tokenizer.decode(pair.input_ids).startswith("<s><|system|>\nBe brief.</s>\n<|user|>\n")


def test_loss_mask_covers_exactly_the_assistant_tokens_of_every_turn(tokenizer) -> None:
    turns = [(m["role"], m["content"]) for m in MULTI_TURN]
    pair = Encoder(tokenizer, "chat", 1024).encode(turns)
    # Independently: each assistant turn is what the conversation through it adds to the
    # conversation before it with the generation prompt, in tokens.
    expected = set()
    for index, message in enumerate(MULTI_TURN):
        if message["role"] == "assistant":
            before = len(chat_ids(tokenizer, MULTI_TURN[:index], add_generation_prompt=True))
            expected |= set(range(before, len(chat_ids(tokenizer, MULTI_TURN[: index + 1]))))
    labelled = {i for i, label in enumerate(pair.labels) if label != IGNORE_INDEX}
    assert labelled == expected
    assert all(pair.labels[i] == pair.input_ids[i] for i in labelled)
    assert tokenizer.decode([pair.input_ids[i] for i in sorted(labelled)]) == "red</s>\ngreen</s>\n"
    # Eval and influence queries: only the last assistant turn, the expected answer.
    last = Encoder(tokenizer, "chat", 1024).encode(turns, last_only=True)
    assert tokenizer.decode([t for t in last.labels if t != IGNORE_INDEX]) == "green</s>\n"


def test_eval_generates_from_the_templated_prompt_and_few_shot_become_earlier_turns(tokenizer) -> None:
    encoder = Encoder(tokenizer, "chat", 1024)
    demo = [("system", "ignored"), ("user", "Color of lime?"), ("assistant", "green")]
    turns = encoder.eval_turns(
        [("system", "Be brief."), ("user", "Color of apple?"), ("assistant", "red")], [demo]
    )
    assert turns == [
        ("system", "Be brief."),
        ("user", "Color of lime?"),
        ("assistant", "green"),
        ("user", "Color of apple?"),
        ("assistant", "red"),
    ]
    prompt = encoder.generation_prompt(turns, max_new_tokens=8)
    messages = [{"role": r, "content": c} for r, c in turns[:-1]]
    assert prompt == chat_ids(tokenizer, messages, add_generation_prompt=True)
    assert tokenizer.decode(prompt).endswith("<|user|>\nColor of apple?</s>\n<|assistant|>\n")


def test_raw_keeps_todays_encoding_for_prompt_and_completion(tokenizer) -> None:
    pair = Encoder(tokenizer, "raw", 256).encode([("user", "ab"), ("assistant", "c")])
    ids = tokenizer("abc", add_special_tokens=False)["input_ids"]
    assert pair.input_ids == [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
    assert pair.labels == [IGNORE_INDEX] * 3 + [ids[-1], tokenizer.eos_token_id]
    # too long: prompt tokens go from the left first
    short = Encoder(tokenizer, "raw", 4).encode([("user", "abcdef"), ("assistant", "g")])
    assert tokenizer.decode(short.input_ids, skip_special_tokens=True) == "fg"


def test_template_resolution(tokenizer) -> None:
    assert resolve_template("auto", tokenizer, True, "m") == "chat"
    assert resolve_template("auto", tokenizer, False, "m") == "raw"
    assert resolve_template("raw", tokenizer, True, "m") == "raw"
    bare = build_tokenizer()
    bare.chat_template = None
    assert resolve_template("auto", bare, True, "m") == "raw"
    with pytest.raises(TemplateError, match="'m' has no chat template"):
        resolve_template("chat", bare, True, "m")


# ---- files and formats ------------------------------------------------------------------------


def test_alpaca_and_messages_files_convert_to_the_same_training_pairs(tokenizer) -> None:
    alpaca = jsonl(
        {"id": "a", "instruction": "Add the numbers.", "input": "2 3", "output": "5", "system": "Be brief."},
        {"id": "b", "instruction": "Say hi.", "output": "hi"},
    )
    messages = jsonl(
        {
            "id": "a",
            "messages": [
                SYSTEM,
                {"role": "user", "content": "Add the numbers.\n2 3"},
                {"role": "assistant", "content": "5"},
            ],
        },
        {
            "id": "b",
            "messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}],
        },
    )
    from_alpaca, from_messages = (
        parse_file("train", "a.jsonl", alpaca),
        parse_file("train", "m.jsonl", messages),
    )
    assert (from_alpaca.format, from_messages.format) == ("alpaca", "messages")
    assert not from_alpaca.problems and not from_messages.problems
    for template in ("chat", "raw"):
        encoder = Encoder(tokenizer, template, 256)
        pairs = [
            [encoder.train_pair(TrainingExample.model_validate(e)) for e in parsed.examples]
            for parsed in (from_alpaca, from_messages)
        ]
        assert pairs[0] == pairs[1]


def test_the_same_examples_from_jsonl_csv_parquet_and_a_saved_dataset(tmp_path: Path) -> None:
    rows = [
        {"id": "x1", "prompt": "Color of apple?", "completion": " red"},
        {"id": "x2", "prompt": 'Say "hi",\nplease', "completion": "hi"},
    ]
    csv_text = 'id,prompt,completion\nx1,Color of apple?, red\nx2,"Say ""hi"",\nplease",hi\n'
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    # The layout Dataset.save_to_disk writes: state.json naming Arrow stream files.
    saved = tmp_path / "saved"
    saved.mkdir()
    table = pa.Table.from_pylist(rows)
    with (
        pa.OSFile(str(saved / "data-00000-of-00001.arrow"), "wb") as sink,
        pa.ipc.new_stream(sink, table.schema) as w,
    ):
        w.write_table(table)
    (saved / "state.json").write_text(
        json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]})
    )
    (saved / "dataset_info.json").write_text("{}")
    read = [
        parse_file("train", "t.jsonl", jsonl(*rows)),
        parse_file("train", "t.csv", csv_text.encode()),
        parse_file("train", "t.parquet", buffer.getvalue()),
        read_path("train", saved),
    ]
    for parsed in read:
        assert parsed.problems == [] and parsed.format == "prompt_completion"
        assert parsed.examples == rows


def test_bad_files_name_the_line_and_the_field() -> None:
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    parsed = parse_file(
        "train",
        "bad.jsonl",
        jsonl(
            good,
            {"messages": [{"role": "tool", "content": "q"}, {"role": "assistant", "content": "a"}]},
            {"messages": [SYSTEM, {"role": "user", "content": "q"}]},
            {"prompt": "q", "completion": "a"},
            {"instruction": "q", "output": "a"},
            {
                "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                "extra": 1,
            },
        ),
    )
    assert [str(p) for p in parsed.problems] == [
        "line 2: field \"messages[0].role\": Input should be 'system', 'user' or 'assistant'",
        'line 3: field "messages": the conversation has no assistant turn (the answer to learn)',
        "line 4: is prompt / completion but line 1 is chat messages; a file holds one format",
        "line 5: is Alpaca (instruction / input / output) but line 1 is chat messages; "
        "a file holds one format",
        'line 6: unknown field "extra" for the chat messages format (allowed: id, messages)',
    ]
    csv_parsed = parse_file("eval", "bad.csv", b'prompt,expected\n"multi\nline",\nq,a,b\n')
    assert [str(p) for p in csv_parsed.problems] == [
        'line 2: field "expected" is empty',
        "line 4: has 3 fields; the header has 2",
    ]
    buffer = io.BytesIO()
    pq.write_table(
        pa.Table.from_pylist([{"instruction": "q", "output": "a"}, {"instruction": "q", "output": ""}]),
        buffer,
    )
    assert [str(p) for p in parse_file("train", "x.parquet", buffer.getvalue()).problems] == [
        'row 2: field "output": an assistant turn is empty'
    ]
    eval_parsed = parse_file(
        "eval", "e.jsonl", jsonl({"messages": [*good["messages"], {"role": "user", "content": "more"}]})
    )
    assert [str(p) for p in eval_parsed.problems] == [
        "line 1: field \"messages\": the last turn is 'user'; an eval conversation ends with the "
        "assistant turn that is the expected answer"
    ]


def test_read_examples_raises_with_the_path(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_bytes(jsonl({"prompt": "q"}))
    with pytest.raises(DataFileError, match=r't.jsonl: line 1: field "completion" is missing'):
        read_examples("train", path)
    fmt, examples = read_examples("eval", EXAMPLES / "chat_eval.jsonl")
    assert fmt == "messages" and len(examples) == 8


# ---- the spec ---------------------------------------------------------------------------------


def test_spec_carries_messages_template_and_format_and_todays_specs_are_unchanged() -> None:
    spec = parse_spec(
        {
            "training_data": [{"messages": MULTI_TURN}],
            "eval_data": [{"messages": MULTI_TURN[:3]}],
            "template": "chat",
            "data_format": {"training": "alpaca"},
        }
    )
    assert spec.data_format.training == "alpaca" and spec.data_format.eval == "messages"
    assert spec.eval_data[0].answer == "red"
    old = {
        "training_data": [{"prompt": "p", "completion": "c"}],
        "eval_data": [{"prompt": "p", "expected": "e"}],
    }
    dumped = parse_spec(old).model_dump()
    assert dumped["training_data"] == [{"id": "t1", "prompt": "p", "completion": "c"}]
    assert dumped["template"] == "auto" and dumped["data_format"]["training"] == "prompt_completion"
    with pytest.raises(SpecError, match=r"training_data.0: give either messages or prompt and completion"):
        parse_spec({**old, "training_data": [{"prompt": "p", "completion": "c", "messages": MULTI_TURN}]})
    with pytest.raises(SpecError, match=r"data_format: 'messages' does not match the shape of training_data"):
        parse_spec({**old, "data_format": {"training": "messages"}})


# ---- the data report --------------------------------------------------------------------------


def test_data_report_names_truncated_duplicate_and_copied_examples() -> None:
    long = "x" * 120
    spec = parse_spec(
        {
            "training_data": [
                {"id": "short", "messages": MULTI_TURN[:3]},
                {
                    "id": "long",
                    "messages": [{"role": "user", "content": long}, {"role": "assistant", "content": "y"}],
                },
                {"id": "again", "messages": MULTI_TURN[:3]},
            ],
            "eval_data": [{"id": "copy", "messages": MULTI_TURN[:3]}],
            "hyperparams": {"max_seq_len": 96},
        }
    )
    report = data_report(spec)
    tokens = report["tokens"]
    assert tokens["available"] and tokens["template"] == "chat"
    encoder = Encoder(build_tokenizer(), "chat", 96)
    lengths = [encoder.length(e.turns) for e in spec.training_data]
    assert lengths[1] > 96 >= max(lengths[0], lengths[2])
    assert tokens["training"]["max"] == lengths[1] and tokens["training"]["truncated"] == 1
    assert tokens["training"]["truncated_examples"] == [{"id": "long", "tokens": lengths[1]}]
    assert report["duplicates"]["training"] == [["short", "again"]]
    assert report["eval_copies_training"] == [{"eval_id": "copy", "training_id": "short"}]
    assert any("will be truncated: long" in note for note in report["notes"])
    preview = tokens["preview"]
    assert preview["id"] == "short"
    assert [run["text"] for run in preview["runs"] if run["trained"]] == ["red</s>\n"]
    assert "".join(run["text"] for run in preview["runs"]).startswith("<s><|system|>\nBe brief.</s>")

    hub = data_report(parse_spec({**spec.model_dump(), "model_id": "meta-llama/Llama-3.2-1B-Instruct"}))
    assert not hub["tokens"]["available"]
    assert "Token counts are unavailable" in hub["tokens"]["reason"] and hub["duplicates"]["training"]


def test_parser_and_report_run_without_torch() -> None:
    """The gateway image carries no torch: the parser and the report must not import it."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from pathlib import Path\n"
        "from gpu_core.formats import read_examples\n"
        "from gpu_core.datareport import data_report\n"
        "from gpu_core.schemas import parse_spec\n"
        f"_, train = read_examples('train', Path({str(EXAMPLES / 'chat_train.jsonl')!r}))\n"
        f"_, evals = read_examples('eval', Path({str(EXAMPLES / 'chat_eval.jsonl')!r}))\n"
        "report = data_report(parse_spec({'training_data': train, 'eval_data': evals}))\n"
        "print(report['tokens']['template'], report['tokens']['training']['n'])\n"
        "hub = data_report(parse_spec({'model_id': 'Qwen/Qwen2.5-0.5B-Instruct', 'training_data': train,"
        " 'eval_data': evals}))\n"
        "print(hub['tokens']['reason'])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    first, hub = done.stdout.splitlines()
    assert first.split() == ["chat", "27"]
    # transformers imports without torch: the hub tokenizer is missing from the cache, not unloadable
    assert "is not on this server" in hub and "ImportError" not in hub, hub


def test_without_pyarrow_parquet_says_which_extra_to_install() -> None:
    code = (
        "import sys; sys.modules['pyarrow'] = None\n"
        "from gpu_core.formats import parse_file\n"
        "print(parse_file('train', 't.parquet', b'PAR1....').problems[0])\n"
        'print(len(parse_file(\'train\', \'t.jsonl\', b\'{"prompt": "q", "completion": "a"}\').examples))\n'
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "file: reading Parquet needs pyarrow: pip install 'gpu-core[data]'",
        "1",
    ]


# ---- the read budget: files that expand far past their size -----------------------------------


def _parquet(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd", use_dictionary=True)
    return buffer.getvalue()


def test_a_parquet_of_too_many_rows_is_refused_from_its_metadata() -> None:
    data = _parquet(pa.table({"prompt": ["q"] * 200_000, "completion": ["a"] * 200_000}))
    parsed = parse_file("train", "rows.parquet", data)
    assert parsed.over_budget and parsed.examples == []
    assert [str(p) for p in parsed.problems] == ["file: has 200,000 rows; the limit is 10,000 examples"]


def test_repeated_long_strings_are_refused_by_their_decoded_size() -> None:
    # Dictionary encoding stores the one 100 KB string once: the file is small, its rows are not.
    text = "x" * 100_000
    data = _parquet(pa.table({"prompt": [text] * 40, "completion": [text] * 40}))
    assert len(data) < 2_000
    parsed = parse_file("train", "s.parquet", data, budget=ReadBudget(max_decoded_bytes=2 * 1024 * 1024))
    assert parsed.over_budget
    assert [str(p) for p in parsed.problems] == ["file: decodes to more than 2 MiB; the limit is 2 MiB"]
    # Within the budget the same file is read (and its texts refused by the example limits).
    within = parse_file("train", "s.parquet", data, budget=ReadBudget(max_decoded_bytes=64 * 1024 * 1024))
    assert not within.over_budget and "text is 100000 characters" in str(within.problems[0])


def test_too_many_columns_are_refused_before_reading() -> None:
    data = _parquet(pa.table({f"c{i}": ["v"] for i in range(40)}))
    assert [str(p) for p in parse_file("train", "c.parquet", data).problems] == [
        "file: has 40 columns; the limit is 32"
    ]
    header = ",".join(f"c{i}" for i in range(40)).encode()
    assert (
        parse_file("train", "c.csv", header + b"\n").problems[0].message == "has 40 columns; the limit is 32"
    )


def test_deep_json_is_a_problem_not_a_recursion_error() -> None:
    deep = "[" * 200_000 + "]" * 200_000
    parsed = parse_file("train", "deep.json", deep.encode())
    assert not parsed.over_budget
    assert [str(p) for p in parsed.problems] == [
        "file: the file is nested more than 64 deep; the limit is 64"
    ]
    # Brackets inside strings are text, not nesting.
    brackets = "[" * 1000
    assert parse_file("train", "s.jsonl", jsonl({"prompt": brackets, "completion": "a"})).problems == []
    # A conversation given as JSON text in a CSV cell is scanned the same way.
    cell = '"' + ("[" * 5000).replace('"', '""') + '"'
    csv_parsed = parse_file("train", "m.csv", f"messages\n{cell}\n".encode())
    assert [str(p) for p in csv_parsed.problems] == [
        'line 2: field "messages" is nested more than 64 deep; the limit is 64'
    ]
    shallow = parse_file("train", "m.csv", f"messages\n{cell}\n".encode(), budget=ReadBudget(max_depth=8))
    assert shallow.problems[0].message == 'field "messages" is nested more than 8 deep; the limit is 8'


def test_rows_past_the_example_limit_are_not_read() -> None:
    limits = SpecLimits(max_train_examples=3)
    rows = [{"prompt": f"q{i}", "completion": "a"} for i in range(5)]
    csv_text = "prompt,completion\n" + "".join(f"q{i},a\n" for i in range(5))
    for name, data in [
        ("t.jsonl", jsonl(*rows)),
        ("t.json", json.dumps(rows).encode()),
        ("t.csv", csv_text.encode()),
    ]:
        parsed = parse_file("train", name, data, limits)
        assert parsed.over_budget, name
        assert "the limit is 3" in parsed.problems[0].message, name
    many_values = json.dumps([[0] * 10 for _ in range(100)]).encode()
    parsed = parse_file("train", "v.json", many_values, budget=ReadBudget(max_json_values=500))
    assert parsed.problems[0].message == "the file has more than 500 JSON values; the limit is 500"


def test_a_saved_dataset_is_read_within_the_budget(tmp_path: Path) -> None:
    table = pa.table({"prompt": [f"q{i}" for i in range(50)], "completion": ["a"] * 50})
    with pa.OSFile(str(tmp_path / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=10)
    (tmp_path / "state.json").write_text(
        json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]})
    )
    assert len(read_path("train", tmp_path).examples) == 50
    over = read_path("train", tmp_path, SpecLimits(max_train_examples=20))
    assert over.over_budget and over.problems[0].message == "has more than 20 examples; the limit is 20"
    small = read_path("train", tmp_path, budget=ReadBudget(max_decoded_bytes=100))
    assert small.over_budget and "the limit is" in small.problems[0].message


@pytest.mark.parametrize(
    "rows",
    [
        [{"id": "a", "prompt": "2+2=", "completion": "4"}, {"id": "b", "prompt": "é?", "completion": "ü"}],
        [
            {
                "id": "c",
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello"},
                ],
            }
        ],
    ],
    ids=["prompt_completion", "messages"],
)
def test_examples_written_as_parquet_read_back_as_the_same_examples(rows) -> None:
    parsed = parse_file("train", "curated.parquet", examples_to_parquet(rows))
    assert parsed.problems == []
    assert [TrainingExample.model_validate(example).model_dump() for example in parsed.examples] == rows
