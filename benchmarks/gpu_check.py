"""``make gpu-check``: one prepared run on one CUDA GPU (H100/H200 class), meant to finish in
under 8 minutes, of the real gpu_core pipeline on a model with a real architecture's shape.

- Model: ``meta-llama/Llama-3.2-1B`` when it is in the local Hugging Face cache, otherwise a
  Llama-3.2-1B-shaped model (hidden 2048, 16 layers, 32 heads / 8 KV heads, FFN 8192, vocab
  128,256, tied embeddings; random init, seeded) with gpu_core's byte-level tokenizer, saved to
  a temporary directory and loaded through the ordinary ``from_pretrained`` path.
- Cases: bf16 and 4-bit (bitsandbytes NF4) x every influence method (tracin, datainf,
  kronfluence, trackstar) on 256 train x 32 eval, LoRA r=8 on q,v, 1 epoch, max_seq_len 128;
  then the projected index (trackstar, projection_dim 4,096) at 10,000 train x 100 eval, bf16.
- Prints per case: wall time, peak GPU memory (``torch.cuda.max_memory_allocated``), the
  stage timings and, for the index, build throughput (training examples per second, from the
  index manifest).

Without CUDA it refuses (exit status 2) before loading anything.

    .venv/bin/python benchmarks/gpu_check.py [--skip-4bit] [--index-train 10000]
"""

from __future__ import annotations

import argparse
import json
import random
import string
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from gpu_core.influence_methods import INFLUENCE_METHODS  # torch-free

EXIT_NO_CUDA = 2
REAL_MODEL = "meta-llama/Llama-3.2-1B"
BUDGET_S = 8 * 60


def llama_1b_config(vocab_size: int, pad: int, bos: int, eos: int):
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


def prepare_model(directory: Path) -> tuple[str, str]:
    """(model id or directory, description)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(REAL_MODEL, "config.json"), str):
            return REAL_MODEL, f"{REAL_MODEL} (local Hugging Face cache)"
    except ImportError:
        pass
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
    return str(directory), f"Llama-3.2-1B-shaped, random init ({params:.2f}B parameters)"


def examples(count: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    words = [
        " ".join("".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 8))) for _ in range(6))
        for _ in range(count)
    ]
    return [(f"Repeat: {w}\nAnswer:", f" {w}") for w in words]


def spec_for(model_id: str, n_train: int, n_eval: int, method: str, quantization: str, **influence) -> dict:
    pairs = examples(n_train + n_eval, n_train)
    return {
        "model_id": model_id,
        "training_data": [{"prompt": p, "completion": c} for p, c in pairs[:n_train]],
        "eval_data": [{"prompt": p, "expected": c} for p, c in pairs[n_train:]],
        "hyperparams": {
            "epochs": 1,
            "batch_size": 16,
            "learning_rate": 2e-4,
            "max_seq_len": 128,
            "max_new_tokens": 4,
            "quantization": quantization,
        },
        "few_shot_k": 0,
        "influence_method": method,
        "influence": influence,
    }


def run_case(name: str, raw_spec: dict, work: Path) -> dict:
    import torch

    from gpu_core.pipeline import run_experiment_to_result
    from gpu_core.schemas import NO_SIZE_LIMITS, parse_spec

    spec = parse_spec(raw_spec, NO_SIZE_LIMITS)
    artifacts = work / name
    torch.cuda.reset_peak_memory_stats()
    started = time.monotonic()
    result = run_experiment_to_result(spec, artifacts)
    row = {
        "case": name,
        "wall_s": round(time.monotonic() - started, 1),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "timings": {k: round(v, 1) for k, v in result.timings.items()},
        "finetuned_loss": round(result.eval_results.finetuned.metrics.mean_loss, 3),
    }
    manifest_path = artifacts / "gradient_index" / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        row["index_examples_per_s"] = round(manifest["n_examples"] / manifest["build_wall_s"], 1)
        row["index_mib"] = round(sum(p.stat().st_size for p in manifest_path.parent.iterdir()) / 2**20, 1)
    print(json.dumps(row), flush=True)
    return row


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--skip-4bit", action="store_true", help="bf16 cases only")
    parser.add_argument("--index-train", type=int, default=10_000, help="training examples of the index case")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print(
            "gpu-check needs a CUDA GPU (H100/H200 class) and found none "
            f"(torch {torch.__version__}, torch.cuda.is_available() is False); nothing was run.",
            file=sys.stderr,
        )
        return EXIT_NO_CUDA
    from gpu_core.models import quantization_unsupported_reason

    started = time.monotonic()
    print(f"gpu-check on {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        model_id, description = prepare_model(work / "model")
        print(f"model: {description}; setup {time.monotonic() - started:.0f} s", flush=True)
        quantizations = ["none"]
        reason = quantization_unsupported_reason(torch.device("cuda"))
        if args.skip_4bit:
            print("4-bit cases skipped (--skip-4bit)")
        elif reason is not None:
            print(f"4-bit cases skipped: {reason}")
        else:
            quantizations.append("4bit")
        for quantization in quantizations:
            for method in INFLUENCE_METHODS:
                name = f"{method}-{'bf16' if quantization == 'none' else quantization}"
                rows.append(run_case(name, spec_for(model_id, 256, 32, method, quantization), work))
        index_spec = spec_for(model_id, args.index_train, 100, "trackstar", "none", projection_dim=4096)
        rows.append(run_case(f"trackstar-index-{args.index_train}", index_spec, work))
    total = time.monotonic() - started
    print(f"\n{'case':<24} {'wall s':>7} {'peak GPU GiB':>12} {'index ex/s':>10}")
    for row in rows:
        print(
            f"{row['case']:<24} {row['wall_s']:>7.1f} {row['peak_gpu_gib']:>12.2f} "
            f"{row.get('index_examples_per_s', ''):>10}"
        )
    print(f"total {total:.0f} s (budget {BUDGET_S} s){'' if total <= BUDGET_S else ' OVER BUDGET'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
