"""Influence at scale (``make bench-scale``): a benchmark, not a test. Three parts:

- ``scale``: ``python -m gpu_core run`` (tiny model, 1 epoch, batch 32, few_shot_k 0,
  max_new_tokens 1, max_seq_len 32, trackstar with projection_dim 4,096) on N train x 100 eval
  for each N of ``--sizes`` (10k, 30k, 100k), under ``/usr/bin/time``: wall and user+sys time,
  peak RSS, index bytes, index build time per training example (from the index manifest).
- ``accuracy``: projected TracIn against exact TracIn on 2,000 train x 100 eval (toy LoRA
  setup, 3 checkpoints): mean per-eval-example Spearman at k = 1,024 and 4,096.
- ``lds``: the linear datamodeling score (TRAK) of every method on a small task: a letter
  cipher (``abc:`` -> the letters mapped through a fixed permutation), 256 train x 32 eval;
  ``--subsets`` random halves, each a fresh LoRA fine-tune (same seed and hyperparameters) of
  the tiny model; per eval example the Spearman correlation across subsets of the summed scores
  of the kept examples with minus the eval loss after retraining; mean over eval examples.

    .venv/bin/python benchmarks/bench_scale.py [--parts scale,accuracy,lds] [--sizes 10000,30000,100000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
from scipy.stats import spearmanr

SCALE_EVAL = 100
LETTERS = string.ascii_lowercase


def cipher_pairs(count: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    mapping = dict(zip(LETTERS, random.Random(1234).sample(LETTERS, len(LETTERS)), strict=True))
    words = ["".join(rng.choices(LETTERS, k=rng.randint(3, 6))) for _ in range(count)]
    return [(word + ":", "".join(mapping[c] for c in word)) for word in words]


# --- scale: the pipeline at 10k / 30k / 100k --------------------------------------------------


def scale_spec(n_train: int, method: str, projection_dim: int) -> dict:
    pairs = cipher_pairs(n_train + SCALE_EVAL, seed=n_train)
    return {
        "model_id": "local/tiny-llama",
        "training_data": [{"prompt": p, "completion": c} for p, c in pairs[:n_train]],
        "eval_data": [{"prompt": p, "expected": c} for p, c in pairs[n_train:]],
        "hyperparams": {
            "epochs": 1,
            "batch_size": 32,
            "learning_rate": 0.004,
            "max_seq_len": 32,
            "max_new_tokens": 1,
        },
        "few_shot_k": 0,
        "influence_method": method,
        "influence": {"projection_dim": projection_dim},
    }


def run_scale(sizes: Sequence[int], method: str, projection_dim: int, work: Path) -> list[dict]:
    rows = []
    for n_train in sizes:
        case = work / f"scale-{n_train}"
        case.mkdir(parents=True, exist_ok=True)
        spec_path = case / "spec.json"
        spec_path.write_text(json.dumps(scale_spec(n_train, method, projection_dim)))
        artifacts = case / "artifacts"
        command = [
            "/usr/bin/time",
            "-f",
            "%e %U %S %M",
            sys.executable,
            "-m",
            "gpu_core",
            "run",
            str(spec_path),
            "--out",
            str(case / "result.json"),
            "--artifacts",
            str(artifacts),
            "--quiet",
            "--no-size-limits",
        ]
        print("$ " + " ".join(command[4:]), flush=True)
        completed = subprocess.run(command, capture_output=True, text=True, check=False)
        if completed.returncode != 0:
            print(completed.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"the pipeline failed at {n_train} training examples")
        wall, user, system, max_rss_kib = completed.stderr.strip().splitlines()[-1].split()
        manifest = json.loads((artifacts / "gradient_index" / "manifest.json").read_text())
        index_bytes = sum(p.stat().st_size for p in (artifacts / "gradient_index").iterdir())
        timings = json.loads((case / "result.json").read_text())["timings"]
        row = {
            "n_train": n_train,
            "wall_s": float(wall),
            "cpu_s": float(user) + float(system),
            "peak_rss_mib": int(max_rss_kib) / 1024,
            "index_mib": index_bytes / 2**20,
            "build_wall_s": manifest["build_wall_s"],
            "build_cpu_s": manifest["build_cpu_s"],
            "build_us_per_example": manifest["build_wall_s"] / n_train * 1e6,
            "build_cpu_us_per_example": manifest["build_cpu_s"] / n_train * 1e6,
            "timings": timings,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        # The figures are taken; the spec and result JSON are large at 100k.
        for path in (case / "result.json", spec_path):
            path.unlink()
    print(f"\n{method}, projection_dim {projection_dim}, x {SCALE_EVAL} eval, batch 32, 1 epoch:")
    print(
        f"{'n_train':>8} {'wall s':>8} {'cpu s':>8} {'peak RSS MiB':>12} {'index MiB':>10} "
        f"{'build s':>8} {'build us/ex':>11} {'build cpu us/ex':>15}"
    )
    for r in rows:
        print(
            f"{r['n_train']:>8} {r['wall_s']:>8.1f} {r['cpu_s']:>8.1f} {r['peak_rss_mib']:>12.0f} "
            f"{r['index_mib']:>10.1f} {r['build_wall_s']:>8.1f} {r['build_us_per_example']:>11.0f} "
            f"{r['build_cpu_us_per_example']:>15.0f}"
        )
    for r in rows:
        stages = {k: round(v, 1) for k, v in r["timings"].items()}
        print(f"  n={r['n_train']}: stage timings {json.dumps(stages)}")
    return rows


# --- accuracy: projected vs exact TracIn -----------------------------------------------------


def mean_spearman(scores: torch.Tensor, reference: torch.Tensor) -> float:
    values = [spearmanr(scores[i].numpy(), reference[i].numpy()).statistic for i in range(len(reference))]
    return float(sum(values) / len(values))


def run_accuracy(n_train: int, n_eval: int, dims: Sequence[int], work: Path) -> dict:
    from benchmarks.toy import build_toy_setup
    from gpu_core.influence import compute_influence
    from gpu_core.schemas import InfluenceOptions

    setup = build_toy_setup(n_train, n_eval)

    def scores(options: InfluenceOptions) -> torch.Tensor:
        return compute_influence(
            "tracin",
            setup.model,
            setup.tokenizer,
            setup.train,
            setup.queries,
            setup.checkpoints,
            options,
            64,
            work,
        )

    exact = scores(InfluenceOptions())
    result = {}
    for dim in dims:
        started = time.process_time()
        projected = scores(InfluenceOptions(projection_dim=dim))
        result[dim] = {"spearman": mean_spearman(projected, exact), "cpu_s": time.process_time() - started}
    print(f"\nprojected vs exact TracIn, {n_train} train x {n_eval} eval, 3 checkpoints, d = 3,584:")
    for dim, row in result.items():
        print(f"  k = {dim:>5}: mean Spearman {row['spearman']:.4f} ({row['cpu_s']:.1f} cpu s)")
    return result


# --- LDS --------------------------------------------------------------------------------------

LDS_TRAIN, LDS_EVAL = 256, 32


def _fine_tune(base_dir: Path, pairs, hyperparams, tokenizer):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from gpu_core.training import train_lora

    base = AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager")
    torch.manual_seed(hyperparams.seed)
    model = get_peft_model(
        base,
        LoraConfig(
            r=hyperparams.lora_r,
            lora_alpha=hyperparams.lora_alpha,
            lora_dropout=0.0,
            target_modules=list(hyperparams.target_modules),
            task_type="CAUSAL_LM",
        ),
    )
    outcome = train_lora(model, pairs, hyperparams, tokenizer.pad_token_id, torch.device("cpu"))
    return model, outcome.checkpoints


def _eval_losses(model, tokenizer, queries) -> torch.Tensor:
    from gpu_core.data import collate
    from gpu_core.influence.gradients import summed_completion_loss

    losses = []
    with torch.no_grad():
        for pair in queries:
            batch = collate([pair], tokenizer.pad_token_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            losses.append(float(summed_completion_loss(logits, batch["labels"])))
    return torch.tensor(losses, dtype=torch.float64)


def run_lds(n_subsets: int, epochs: int, learning_rate: float, work: Path) -> dict:
    from transformers import AutoTokenizer

    from gpu_core.data import encode_pair
    from gpu_core.influence import compute_influence
    from gpu_core.schemas import Hyperparams, InfluenceOptions
    from gpu_core.tiny import tiny_model_dir

    base_dir = tiny_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    pairs = cipher_pairs(LDS_TRAIN + LDS_EVAL, seed=7)
    train = [encode_pair(tokenizer, p, c, 32) for p, c in pairs[:LDS_TRAIN]]
    queries = [encode_pair(tokenizer, p, c, 32) for p, c in pairs[LDS_TRAIN:]]
    hyperparams = Hyperparams(
        epochs=epochs, batch_size=16, learning_rate=learning_rate, max_seq_len=32, seed=0
    )

    started = time.monotonic()
    model, checkpoints = _fine_tune(base_dir, train, hyperparams, tokenizer)
    methods = {
        "tracin": InfluenceOptions(),
        "tracin (k=1024)": InfluenceOptions(projection_dim=1024),
        "datainf": InfluenceOptions(),
        "kronfluence": InfluenceOptions(),
        "trackstar (k=4096)": InfluenceOptions(),
        "trackstar (k=1024)": InfluenceOptions(projection_dim=1024),
    }
    scores = {
        name: compute_influence(
            name.split(" ")[0], model, tokenizer, train, queries, checkpoints, options, 32, work / name[:8]
        )
        for name, options in methods.items()
    }
    full_losses = _eval_losses(model, tokenizer, queries)
    rng = random.Random(0)
    masks, losses = [], []
    for _ in range(n_subsets):
        keep = sorted(rng.sample(range(LDS_TRAIN), LDS_TRAIN // 2))
        mask = torch.zeros(LDS_TRAIN, dtype=torch.float64)
        mask[keep] = 1
        subset_model, _ = _fine_tune(base_dir, [train[i] for i in keep], hyperparams, tokenizer)
        masks.append(mask)
        losses.append(_eval_losses(subset_model, tokenizer, queries))
    masks_t, losses_t = torch.stack(masks), torch.stack(losses)  # [M, n_train], [M, n_eval]
    result = {}
    for name, matrix in scores.items():
        predicted = masks_t @ matrix.T  # [M, n_eval]: summed influence of the kept examples
        per_query = [
            spearmanr(predicted[:, q].numpy(), (-losses_t[:, q]).numpy()).statistic
            for q in range(len(queries))
        ]
        result[name] = float(sum(per_query) / len(per_query))
    print(
        f"\nLDS, letter cipher, {LDS_TRAIN} train x {LDS_EVAL} eval, {n_subsets} random halves retrained "
        f"(LoRA r=8 q,v, {hyperparams.epochs} epochs, lr {hyperparams.learning_rate}); "
        f"full-data eval loss {float(full_losses.mean()):.2f}, halves {float(losses_t.mean()):.2f}; "
        f"{time.monotonic() - started:.0f} s"
    )
    for name, value in result.items():
        print(f"  {name:<20} LDS {value:.3f}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parts", default="scale,accuracy,lds")
    parser.add_argument("--sizes", default="10000,30000,100000")
    parser.add_argument("--method", default="trackstar", choices=["trackstar", "tracin"])
    parser.add_argument("--projection-dim", type=int, default=4096)
    parser.add_argument("--subsets", type=int, default=40, help="LDS retrainings (default 40)")
    parser.add_argument("--lds-epochs", type=int, default=6, help="LDS fine-tuning epochs (default 6)")
    parser.add_argument("--lds-lr", type=float, default=0.004, help="LDS learning rate (default 0.004)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    figures: dict = {"machine": os.uname().nodename, "cpus": os.cpu_count(), "torch": torch.__version__}
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as work:
        if "accuracy" in parts:
            figures["accuracy"] = run_accuracy(2000, 100, (1024, 4096), Path(work))
        if "lds" in parts:
            figures["lds"] = run_lds(args.subsets, args.lds_epochs, args.lds_lr, Path(work))
        if "scale" in parts:
            sizes = [int(s) for s in args.sizes.split(",")]
            figures["scale"] = run_scale(sizes, args.method, args.projection_dim, Path(work))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
