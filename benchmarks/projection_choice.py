"""Which projection for the gradient index: LoGra's Kronecker-factored per-matrix projection, or
forming the per-example LoRA gradient and applying a sparse JL (CountSketch)?

    .venv/bin/python benchmarks/projection_choice.py

Part 1, cost: one batch (8 sequences x 128 tokens) through the LoRA matrices of a
Llama-3.2-1B-shaped model (16 layers, hidden 2048, LoRA r=8 on q_proj 2048->2048 and v_proj
2048->512: 64 matrices, d = 851,968), activations and output gradients random, k = 4,096.
- kronecker: per matrix, project the inputs a_t (d_in -> p_i) and output gradients delta_t
  (d_out -> p_o) with Gaussian matrices, then sum_t outer products (p_o x p_i = k / 64 per
  matrix); the per-example gradient is never formed (LoGra; bergson's per_module projection).
- formed + countsketch: the per-example gradient sum_t delta_t a_t^T per matrix (what
  gpu_core.influence.gradients forms anyway), then gpu_core's CountSketchProjection.
Part 2, accuracy: real per-example gradients of the tiny model (LoRA r=8 on q,v, d = 3,584),
400 train x 40 eval; mean per-eval-example Spearman of projected against exact inner products.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
from scipy.stats import spearmanr

from benchmarks.toy import build_toy_setup
from gpu_core.influence.gradients import collate_to, lora_grad_enabled, lora_layers, summed_completion_loss
from gpu_core.influence.projection import CountSketchProjection

BATCH, TOKENS, K = 8, 128, 4096
# (d_in, d_out) of lora_A and lora_B of q_proj and v_proj in one Llama-3.2-1B layer, r = 8.
LLAMA_1B_LAYER = [(2048, 8), (8, 2048), (2048, 8), (8, 512)]
LAYERS = 16


def kronecker_factors(shapes, k: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per matrix an (input, output) Gaussian pair whose Kronecker product has ~k/len dims."""
    generator = torch.Generator().manual_seed(seed)
    per_matrix = max(1, k // len(shapes))
    side = max(1, round(per_matrix**0.5))
    factors = []
    for d_in, d_out in shapes:
        p_out = min(side, d_out) if d_out < side else side
        p_in = max(1, per_matrix // p_out)
        factors.append(
            (
                torch.randn(d_in, p_in, generator=generator) / p_in**0.5,
                torch.randn(d_out, p_out, generator=generator) / p_out**0.5,
            )
        )
    return factors


def kronecker_project(inputs, output_grads, factors) -> torch.Tensor:
    parts = []
    for a, delta, (p_in, p_out) in zip(inputs, output_grads, factors, strict=True):
        projected_a = a @ p_in  # [b, t, p_in]
        projected_d = delta @ p_out  # [b, t, p_out]
        parts.append(torch.einsum("bto,bti->boi", projected_d, projected_a).flatten(1))
    return torch.cat(parts, dim=1)


def formed_gradients(inputs, output_grads) -> torch.Tensor:
    return torch.cat(
        [torch.einsum("bto,bti->boi", d, a).flatten(1) for a, d in zip(inputs, output_grads, strict=True)],
        dim=1,
    )


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        started = time.process_time()
        fn()
        times.append(time.process_time() - started)
    return min(times)


def cost() -> None:
    shapes = LLAMA_1B_LAYER * LAYERS
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(BATCH, TOKENS, d_in, generator=generator) for d_in, _ in shapes]
    output_grads = [torch.randn(BATCH, TOKENS, d_out, generator=generator) for _, d_out in shapes]
    factors = kronecker_factors(shapes, K, 0)
    sketch = CountSketchProjection([d_in * d_out for d_in, d_out in shapes], K, 0)
    kron = best_of(3, lambda: kronecker_project(inputs, output_grads, factors))
    formed = best_of(3, lambda: formed_gradients(inputs, output_grads))
    grads = formed_gradients(inputs, output_grads)
    project = best_of(3, lambda: sketch.project(grads))
    kron_dim = kronecker_project(inputs, output_grads, factors).shape[1]
    print(f"cost, Llama-3.2-1B-shaped LoRA (d = {sketch.input_dim:,}), batch {BATCH} x {TOKENS} tokens:")
    print(f"  kronecker (k = {kron_dim}):           {kron * 1000:8.1f} ms cpu")
    print(f"  formed gradient:                {formed * 1000:8.1f} ms cpu")
    print(f"  + countsketch (k = {K}):        {project * 1000:8.1f} ms cpu")
    print(f"  formed + countsketch:           {(formed + project) * 1000:8.1f} ms cpu")
    print(
        f"  factor memory: kronecker {sum(a.numel() + b.numel() for a, b in factors) * 4 / 2**20:.1f} MiB, "
        f"countsketch {sketch.input_dim * 12 / 2**20:.1f} MiB (index + sign per entry)"
    )


def tiny_hooked(setup, pairs, batch_size=50):
    """Per batch: (inputs, output gradients) of every LoRA matrix, plus the formed gradients."""
    layers = lora_layers(setup.model)
    results_inputs, results_grads = [], []
    with lora_grad_enabled(layers):
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            batch = collate_to(chunk, setup.tokenizer.pad_token_id, torch.device("cpu"))
            captured_in: dict[int, torch.Tensor] = {}
            captured_out: dict[int, torch.Tensor] = {}
            handles = []
            for i, layer in enumerate(layers):

                def hook(_m, args, output, i=i, ins=captured_in, outs=captured_out):
                    ins[i] = args[0].detach()
                    outs[i] = output

                handles.append(layer.module.register_forward_hook(hook))
            logits = setup.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = summed_completion_loss(logits, batch["labels"])
            for handle in handles:
                handle.remove()
            grads = torch.autograd.grad(loss, [captured_out[i] for i in range(len(layers))])
            mask = batch["attention_mask"].float().unsqueeze(-1)
            results_inputs.append([captured_in[i] * mask for i in range(len(layers))])
            results_grads.append(list(grads))
    return layers, results_inputs, results_grads


def accuracy() -> None:
    setup = build_toy_setup(400, 40)
    layers, train_in, train_out = tiny_hooked(setup, setup.train)
    _, query_in, query_out = tiny_hooked(setup, setup.queries)
    shapes = [(layer.module.in_features, layer.module.out_features) for layer in layers]

    def stack(ins, outs, fn):
        return torch.cat([fn(a, d) for a, d in zip(ins, outs, strict=True)])

    exact_train = stack(train_in, train_out, formed_gradients)
    exact_query = stack(query_in, query_out, formed_gradients)
    exact = exact_query @ exact_train.T

    def spearman(scores):
        values = [spearmanr(scores[i].numpy(), exact[i].numpy()).statistic for i in range(len(exact))]
        return sum(values) / len(values)

    print(f"accuracy, tiny model (d = {exact_train.shape[1]}), 400 train x 40 eval, mean Spearman vs exact:")
    for k in (1024, 4096):
        rows = []
        for seed in range(3):
            factors = kronecker_factors(shapes, k, seed)
            kron = lambda a, d, f=factors: kronecker_project(a, d, f)  # noqa: E731
            kron_scores = stack(query_in, query_out, kron) @ stack(train_in, train_out, kron).T
            sketch = CountSketchProjection([a * b for a, b in shapes], k, seed)
            sketch_scores = sketch.project(exact_query) @ sketch.project(exact_train).T
            kron_dim = kron(train_in[0], train_out[0]).shape[1]
            rows.append((spearman(kron_scores), spearman(sketch_scores), kron_dim))
        kron_mean = sum(r[0] for r in rows) / len(rows)
        sketch_mean = sum(r[1] for r in rows) / len(rows)
        print(f"  k = {k}: kronecker (k = {rows[0][2]}) {kron_mean:.4f}, countsketch {sketch_mean:.4f}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    cost()
    accuracy()
