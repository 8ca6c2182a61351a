"""``make bench-influence-memory``: peak resident memory of Kronfluence on CPU against the size of
the model, on a ~53M-parameter Llama built in code (random init, no download).

Each measurement runs in a fresh process: build the model (float32, LoRA on the targets, random
LoRA B so that every matrix has gradients), run Kronfluence once on two examples (imports and
allocator warm-up), reset the kernel's peak-RSS mark
(``/proc/self/clear_refs``), run ``kronfluence_scores``, and read the peak (``VmHWM``) minus the
resident memory just before. ``live`` is gpu_core's Kronfluence (the model prepared in place);
``deep-copy`` runs the same on ``copy.deepcopy(model)``, as the code did before, for contrast.
kronfluence's own factors (per tracked matrix its input and output covariances and their
eigenvectors, float32) are printed beside it: they are what Kronfluence needs beyond the model.

Target: the live run's peak grows by less than 10% of the model's size (exit status 1 if not).

    .venv/bin/python -m benchmarks.influence_memory [--targets v_proj] [--n-train 16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TARGET_FRACTION = 0.10
MODES = ("live", "deep-copy")


def model_config() -> Any:
    """~53M parameters: a 32k vocabulary with untied embeddings (most of a small LLM's weights),
    4 layers of width 512 with grouped-query attention and a 5.5x MLP."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=32_000,
        hidden_size=512,
        intermediate_size=2816,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _factor_bytes(model: Any) -> int:
    """EK-FAC's factors of the LoRA matrices: per ``nn.Linear(d_in, d_out)`` a d_in^2 input and a
    d_out^2 output covariance and their eigenvectors, float32."""
    from gpu_core.influence.gradients import lora_layers

    sizes = [layer.module.weight.shape for layer in lora_layers(model)]
    return sum(2 * (d_in * d_in + d_out * d_out) * 4 for d_out, d_in in sizes)


def measure(mode: str, targets: Sequence[str], n_train: int, n_queries: int, seq_len: int) -> dict[str, Any]:
    import copy
    import random

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from gpu_core.data import IGNORE_INDEX, EncodedPair
    from gpu_core.influence.ekfac import kronfluence_scores

    torch.set_num_threads(1)
    torch.manual_seed(0)
    base = LlamaForCausalLM(model_config())
    model_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    n_params = sum(p.numel() for p in base.parameters())
    model = get_peft_model(
        base,
        LoraConfig(r=8, lora_alpha=16, target_modules=list(targets), init_lora_weights=False),
    )
    model.eval()
    rng = random.Random(0)

    def pair() -> EncodedPair:
        ids = [1] + [rng.randrange(3, 32_000) for _ in range(seq_len - 1)]
        labels = [IGNORE_INDEX] * (seq_len // 2) + ids[seq_len // 2 :]
        return EncodedPair(ids, labels)

    train = [pair() for _ in range(n_train)]
    queries = [pair() for _ in range(n_queries)]
    with tempfile.TemporaryDirectory(prefix="influence-memory-") as work:
        # A first small run loads kronfluence's code and warms the allocator: not what is measured.
        kronfluence_scores(model, 0, train[:2], queries[:1], None, 1, Path(work), lambda _f: None)
        Path("/proc/self/clear_refs").write_text("5")  # the peak mark starts from here
        before_kib = _rss_kib("VmRSS")
        started = time.monotonic()
        scored = copy.deepcopy(model) if mode == "deep-copy" else model
        scores = kronfluence_scores(scored, 0, train, queries, None, 1, Path(work), lambda _f: None)
        wall_s = time.monotonic() - started
        peak_kib = _rss_kib("VmHWM")
    if not bool(torch.isfinite(scores).all()):
        raise RuntimeError("kronfluence gave non-finite scores")
    return {
        "mode": mode,
        "parameters": n_params,
        "model_mib": model_bytes / 2**20,
        "rss_growth_mib": (peak_kib - before_kib) / 1024,
        "factor_mib": _factor_bytes(model) / 2**20,
        "wall_s": wall_s,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--targets", default="v_proj", help="LoRA target modules, comma separated")
    parser.add_argument("--n-train", type=int, default=12)
    parser.add_argument("--n-queries", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--mode", choices=MODES, help="measure one mode in this process (internal)")
    args = parser.parse_args(argv)
    targets = args.targets.split(",")
    if args.mode is not None:
        row = measure(args.mode, targets, args.n_train, args.n_queries, args.seq_len)
        print(json.dumps(row), flush=True)
        return 0

    rows = {}
    for mode in MODES:
        command = [sys.executable, "-m", "benchmarks.influence_memory", "--mode", mode]
        command += ["--targets", args.targets, "--n-train", str(args.n_train)]
        command += ["--n-queries", str(args.n_queries), "--seq-len", str(args.seq_len)]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        output = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
        rows[mode] = json.loads(output.strip().splitlines()[-1])
    live = rows["live"]
    print(
        f"model: {live['parameters'] / 1e6:.1f}M parameters, {live['model_mib']:.1f} MiB (float32); "
        f"LoRA r=8 on {args.targets}; {args.n_train} train x {args.n_queries} eval, {args.seq_len} tokens"
    )
    print(f"{'mode':<10} {'peak RSS growth MiB':>20} {'of the model':>13} {'wall s':>7}")
    for mode, row in rows.items():
        share = row["rss_growth_mib"] / row["model_mib"]
        print(f"{mode:<10} {row['rss_growth_mib']:>20.1f} {share:>12.1%} {row['wall_s']:>7.1f}")
    print(f"kronfluence's factors (covariances + eigenvectors): {live['factor_mib']:.1f} MiB")
    share = live["rss_growth_mib"] / live["model_mib"]
    met = share < TARGET_FRACTION
    verdict = "met" if met else "MISSED"
    print(f"target: live growth < {TARGET_FRACTION:.0%} of the model: {share:.1%}, {verdict}")
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
