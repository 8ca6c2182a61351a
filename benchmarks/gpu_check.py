"""``make gpu-check``: one prepared run on one CUDA GPU (H100/H200 class), at most 8 minutes, that
proves gpu_core on a real architecture's shape. The device machine has no internet: it runs
``scripts/gpu_check_device.sh``, which installs the wheels carried from here (``make
gpu-check-wheels``) and then this script (docs/influence.md, "GPU check").

Model: a Llama-3.2-1B-shaped model built in code (hidden 2048, 16 layers, 32 heads / 8 KV heads,
FFN 8192, vocab 128,256, tied embeddings; random init, seeded) with gpu_core's byte-level
tokenizer, saved to a temporary directory and loaded through the ordinary path.

Cases, the riskiest first; each one's failure is recorded and the next one runs:

1. ``kronfluence-4bit``: Kronfluence on the 4-bit (NF4) model, planted duplicates (skipped
   without bitsandbytes or CUDA).
2. ``per-example-gradients-bf16``: gpu_core's batched per-example LoRA gradients against a
   per-sample autograd loop, bf16 (max relative error and the lowest cosine similarity).
3. ``planted-<method>``: every influence method ranks each eval example's planted duplicate
   first (top-1 rate >= 0.9).
4. ``query-adapter-reload``: a follow-up query session reloads the experiment's adapter and
   ranks the duplicate first.
5. ``memory-2048``: peak GPU memory of an experiment at sequence length 2,048 against the cost
   model's prediction for the same workload (measured <= predicted).
6. ``index-throughput``: the projected gradient index (TrackStar) build rate, examples/s.
7. ``chat``: an experiment on chat (messages) data through the model's chat template.

Writes one JSON of figures (``--out``) and exits 1 when any case failed; without CUDA it
refuses (exit 2) before loading anything. ``--device cpu --tiny`` runs the same cases on the
tiny model on the CPU (what the quick test runs; memory and 4-bit are skipped there).

    python -m benchmarks.gpu_check [--out gpu-check.json] [--cases a,b] [--methods m1,m2]
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import random
import string
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpu_core.influence_methods import INFLUENCE_METHODS  # torch-free

EXIT_FAILED = 1
EXIT_NO_CUDA = 2
BUDGET_S = 8 * 60
PLANTED_TOP1_MIN = 0.9
GRADIENT_REL_ERROR_MAX = 0.05  # bf16 keeps ~3 significant digits
GRADIENT_COSINE_MIN = 0.99
CATALOG_TWIN = "meta-llama/Llama-3.2-1B"  # the cost model's card of the same shape


class Skipped(Exception):
    """The case cannot run here; the message says why."""


@dataclass
class CheckContext:
    device: str
    tiny: bool
    work: Path
    methods: Sequence[str]
    index_train: int
    model_id: str = "local/tiny-llama"
    # planted-duplicate experiments by method: (raw spec, spec, result, artifacts folder)
    experiments: dict[str, tuple[dict[str, Any], Any, Any, Path]] = field(default_factory=dict)


Case = tuple[str, Callable[[CheckContext], dict[str, Any]]]


def llama_1b_config(vocab_size: int, pad: int, bos: int, eos: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=131072,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        tie_word_embeddings=True,
        pad_token_id=pad,
        bos_token_id=bos,
        eos_token_id=eos,
    )


def build_1b_model(directory: Path) -> str:
    """The 1B-shaped model saved to ``directory``; its description."""
    import torch
    from transformers import LlamaForCausalLM

    from gpu_core.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    config = llama_1b_config(128256, tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    torch.manual_seed(0)
    with torch.device("cuda"):
        # transformers' @wraps(nn.Module.to) on PreTrainedModel.to hides its bound self from mypy
        model = LlamaForCausalLM(config).to(torch.bfloat16)  # type: ignore[arg-type]
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    params = sum(p.numel() for p in model.parameters()) / 1e9
    del model
    torch.cuda.empty_cache()
    return f"Llama-3.2-1B-shaped, random init ({params:.2f}B parameters)"


def _run(ctx: CheckContext, raw: dict[str, Any], name: str) -> tuple[Any, Any, Path]:
    from gpu_core.pipeline import run_experiment_to_result
    from gpu_core.schemas import NO_SIZE_LIMITS, parse_spec

    raw = {**raw, "model_id": ctx.model_id}
    spec = parse_spec(raw, NO_SIZE_LIMITS)
    artifacts = ctx.work / name
    return spec, run_experiment_to_result(spec, artifacts), artifacts


def planted_raw(ctx: CheckContext, method: str, quantization: str = "none") -> dict[str, Any]:
    from benchmarks.planted import planted_duplicate_spec

    n_train, n_eval, epochs = (8, 2, 20) if ctx.tiny else (64, 8, 2)
    raw = planted_duplicate_spec(method, n_train, n_eval, epochs)
    if not ctx.tiny:
        raw["hyperparams"].update(learning_rate=2e-4, batch_size=16, max_seq_len=64)
    raw["hyperparams"]["quantization"] = quantization
    return raw


def top1_rate(raw: dict[str, Any], result: Any) -> float:
    from benchmarks.planted import duplicate_of

    n_train, n_eval = len(raw["training_data"]), len(raw["eval_data"])
    hits = [
        result.influence.top_k[f"e{i}"].helpful[0].id == f"t{duplicate_of(i, n_train, n_eval)}"
        for i in range(n_eval)
    ]
    return sum(hits) / n_eval


def planted_case(method: str, quantization: str = "none") -> Case:
    def run(ctx: CheckContext) -> dict[str, Any]:
        if quantization == "4bit":
            _require_4bit(ctx)
        raw = planted_raw(ctx, method, quantization)
        spec, result, artifacts = _run(ctx, raw, f"planted-{method}-{quantization}")
        if quantization == "none":
            ctx.experiments[method] = (raw, spec, result, artifacts)
        rate = top1_rate(raw, result)
        if rate < PLANTED_TOP1_MIN:
            raise AssertionError(f"planted-duplicate top-1 rate {rate:.2f} < {PLANTED_TOP1_MIN}")
        return {"top1_rate": rate, "timings": {k: round(v, 2) for k, v in result.timings.items()}}

    suffix = "4bit" if quantization == "4bit" else ""
    return (f"{method}-{suffix}" if suffix else f"planted-{method}", run)


def _require_4bit(ctx: CheckContext) -> None:
    if ctx.device == "cpu":
        raise Skipped("4-bit needs CUDA")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise Skipped("bitsandbytes is not installed")


def gradients_case(ctx: CheckContext) -> dict[str, Any]:
    """Batched per-example gradients vs one autograd backward per example, both bf16."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.toy import random_pairs
    from gpu_core.data import encode_pair
    from gpu_core.influence.gradients import (
        lora_grad_enabled,
        lora_layers,
        stacked_gradients,
        summed_completion_loss,
    )
    from gpu_core.tiny import tiny_model_dir

    directory = tiny_model_dir() if ctx.tiny else Path(ctx.model_id)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    base = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
    # transformers' @wraps(nn.Module.to) on PreTrainedModel.to hides its bound self from mypy
    base = base.to(ctx.device)  # type: ignore[arg-type]
    torch.manual_seed(0)
    model = get_peft_model(
        base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    model.eval()
    layers = lora_layers(model)
    pairs = [encode_pair(tokenizer, p, c, 64) for p, c in random_pairs(8, seed=1)]
    batched = stacked_gradients(model, layers, pairs, tokenizer.pad_token_id, 4).float()
    looped = []
    with lora_grad_enabled(layers):
        for pair in pairs:
            ids = torch.tensor([pair.input_ids], device=ctx.device)
            labels = torch.tensor([pair.labels], device=ctx.device)
            loss = summed_completion_loss(model(input_ids=ids).logits, labels)
            grads = torch.autograd.grad(loss, [layer.module.weight for layer in layers])
            looped.append(torch.cat([g.flatten() for g in grads]).float())
    reference = torch.stack(looped)
    rel_error = float((batched - reference).abs().max() / reference.abs().max())
    cosine = float(torch.nn.functional.cosine_similarity(batched, reference, dim=1).min())
    del model, base
    if rel_error > GRADIENT_REL_ERROR_MAX or cosine < GRADIENT_COSINE_MIN:
        raise AssertionError(
            f"per-example gradients differ: max rel error {rel_error:.3g}, min cosine {cosine:.4f}"
        )
    return {"max_rel_error": rel_error, "min_cosine": cosine, "examples": len(pairs)}


def query_reload_case(ctx: CheckContext) -> dict[str, Any]:
    import torch

    from benchmarks.planted import duplicate_of
    from gpu_core.query import QuerySession
    from gpu_core.schemas import QueryRequest, QueryResult

    if "tracin" not in ctx.experiments:
        raise AssertionError("needs the planted-tracin experiment, which did not finish")
    raw, spec, result, artifacts = ctx.experiments["tracin"]
    train, n_eval = raw["training_data"], len(raw["eval_data"])
    copied = [duplicate_of(i, len(train), n_eval) for i in range(n_eval)]
    request = QueryRequest.model_validate(
        {"queries": [{"prompt": train[j]["prompt"], "expected": train[j]["completion"]} for j in copied]}
    )
    session = QuerySession(spec, result, artifacts, device=torch.device(ctx.device))
    try:
        events = list(session.answer(request))
    finally:
        session.close()
    answered = QueryResult.model_validate(events[-1]["result"])
    top = [outcome.helpful[0].id for outcome in answered.results]
    if top != [f"t{j}" for j in copied]:
        raise AssertionError(f"the reloaded adapter ranks {top} first, not the duplicates")
    return {"source": answered.source, "timings": answered.timings}


def memory_case(ctx: CheckContext) -> dict[str, Any]:
    """Peak GPU memory of an experiment at sequence length 2,048 vs the cost model."""
    import torch

    from cost_model.memory import memory_breakdown
    from cost_model.model_catalog import lookup_model
    from cost_model.workload import Workload

    if ctx.device == "cpu":
        raise Skipped("peak GPU memory needs CUDA")
    rng = random.Random(2)
    # ~2,030 characters each: 2,048 tokens with the byte-level tokenizer
    words = [
        " ".join("".join(rng.choices(string.ascii_lowercase, k=6)) for _ in range(290)) for _ in range(20)
    ]
    raw = {
        "training_data": [{"prompt": w[:1900], "completion": w[1900:2030]} for w in words[:16]],
        "eval_data": [{"prompt": w[:1900], "expected": w[1900:2030]} for w in words[16:]],
        "few_shot_k": 0,
        "influence_method": "tracin",
        "hyperparams": {"epochs": 1, "batch_size": 4, "max_seq_len": 2048, "max_new_tokens": 4},
    }
    torch.cuda.reset_peak_memory_stats()
    spec, _result, _ = _run(ctx, raw, "memory-2048")
    measured_gb = torch.cuda.max_memory_allocated() / 1e9
    card = lookup_model(CATALOG_TWIN)
    predicted = memory_breakdown(card.params_b, card.architecture, Workload.from_spec(spec, card))
    figures = {"measured_gb": round(measured_gb, 2), "predicted": predicted.as_dict()}
    if measured_gb > predicted.total_gb:
        raise AssertionError(
            f"peak {measured_gb:.2f} GB exceeds the cost model's {predicted.total_gb:.2f} GB"
        )
    return figures


def index_case(ctx: CheckContext) -> dict[str, Any]:
    from benchmarks.toy import random_pairs

    pairs = random_pairs(ctx.index_train + 16, seed=3)
    raw = {
        "training_data": [{"prompt": p, "completion": c} for p, c in pairs[: ctx.index_train]],
        "eval_data": [{"prompt": p, "expected": c} for p, c in pairs[ctx.index_train :]],
        "few_shot_k": 0,
        "influence_method": "trackstar",
        "influence": {"projection_dim": 64 if ctx.tiny else 4096},
        "hyperparams": {"epochs": 1, "batch_size": 16, "max_seq_len": 64, "max_new_tokens": 2},
    }
    _spec, _result, artifacts = _run(ctx, raw, "index")
    manifest = json.loads((artifacts / "gradient_index" / "manifest.json").read_text())
    rate = manifest["n_examples"] / manifest["build_wall_s"]
    if manifest["n_examples"] != ctx.index_train or rate <= 0:
        raise AssertionError(f"the index holds {manifest['n_examples']} of {ctx.index_train} examples")
    return {"examples": manifest["n_examples"], "examples_per_s": round(rate, 1)}


def chat_case(ctx: CheckContext) -> dict[str, Any]:
    examples = Path(__file__).resolve().parents[1] / "examples"
    train = [json.loads(line) for line in (examples / "chat_train.jsonl").read_text().splitlines()]
    evals = [json.loads(line) for line in (examples / "chat_eval.jsonl").read_text().splitlines()]
    raw = {
        "training_data": train[:8],
        "eval_data": evals[:2],
        "few_shot_k": 0,
        "influence_method": "tracin",
        "hyperparams": {"epochs": 1, "batch_size": 4, "max_seq_len": 256, "max_new_tokens": 4},
    }
    _spec, result, _ = _run(ctx, raw, "chat")
    if result.data.template != "chat":
        raise AssertionError(f"chat data ran with the {result.data.template!r} template")
    return {"template": result.data.template, "timings": {k: round(v, 2) for k, v in result.timings.items()}}


def all_cases(methods: Sequence[str]) -> list[Case]:
    return [
        planted_case("kronfluence", "4bit"),
        ("per-example-gradients-bf16", gradients_case),
        *(planted_case(method) for method in methods),
        ("query-adapter-reload", query_reload_case),
        ("memory-2048", memory_case),
        ("index-throughput", index_case),
        ("chat", chat_case),
    ]


def _free(device: str) -> None:
    import torch

    gc.collect()
    if device != "cpu":
        torch.cuda.empty_cache()


def run_cases(cases: Sequence[Case], ctx: CheckContext) -> list[dict[str, Any]]:
    """Every case in order; one that raises is recorded as failed and the next one runs."""
    rows = []
    for name, run in cases:
        started = time.monotonic()
        row: dict[str, Any] = {"case": name}
        try:
            row["figures"] = run(ctx)
            row["status"] = "passed"
        except Skipped as reason:
            row.update(status="skipped", reason=str(reason))
        except Exception as exc:
            row.update(status="failed", error=f"{type(exc).__name__}: {exc}")
            row["traceback"] = traceback.format_exc(limit=-4)
        finally:
            _free(ctx.device)
        row["wall_s"] = round(time.monotonic() - started, 1)
        print(json.dumps({k: v for k, v in row.items() if k != "traceback"}), flush=True)
        rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="the tiny model instead of the 1B shape")
    parser.add_argument("--out", type=Path, default=Path("gpu-check.json"), help="the JSON of figures")
    parser.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    parser.add_argument("--methods", default=",".join(INFLUENCE_METHODS), help="planted-duplicate methods")
    parser.add_argument("--index-train", type=int, default=None, help="training examples of the index case")
    args = parser.parse_args(argv)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            f"gpu-check: no CUDA GPU here (torch {torch.__version__}); nothing was run. "
            "Run scripts/gpu_check_device.sh on a GPU machine (docs/influence.md).",
            file=sys.stderr,
        )
        return EXIT_NO_CUDA
    device = "cuda:0" if args.device == "cuda" else "cpu"
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        ctx = CheckContext(
            device=device,
            tiny=args.tiny,
            work=Path(tmp),
            methods=args.methods.split(","),
            index_train=args.index_train or (32 if args.tiny else 4000),
        )
        if args.tiny:
            description = "local/tiny-llama"
        else:
            ctx.model_id = str(ctx.work / "model")
            description = build_1b_model(Path(ctx.model_id))
        cases = all_cases(ctx.methods)
        if args.cases:
            wanted = args.cases.split(",")
            cases = [case for case in cases if any(case[0].startswith(w) for w in wanted)]
        name = torch.cuda.get_device_name(0) if device != "cpu" else "cpu"
        print(f"gpu-check on {name}, torch {torch.__version__}, model {description}", flush=True)
        rows = run_cases(cases, ctx)
    total = time.monotonic() - started
    failed = [row["case"] for row in rows if row["status"] == "failed"]
    report = {
        "device": name,
        "torch": torch.__version__,
        "model": description,
        "total_s": round(total, 1),
        "budget_s": BUDGET_S,
        "failed": failed,
        "cases": rows,
    }
    args.out.write_text(json.dumps(report, indent=2))
    verdict = f"FAILED: {', '.join(failed)}" if failed else "all passed"
    print(f"gpu-check: {verdict}; {total:.0f} s (budget {BUDGET_S} s); figures in {args.out}", flush=True)
    return EXIT_FAILED if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
