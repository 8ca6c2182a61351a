"""How long an experiment takes on one GPU.

time = cold start + model load + (train + eval + influence FLOPs) / effective throughput
       + generation time + fixed pipeline overhead

- train FLOPs = 6 x N x train tokens x epochs (N = parameters; forward + backward);
- eval: three runs (base, few-shot, fine-tuned); each does a forward over its prompts
  (2 x N x tokens) and greedy generation of max_new_tokens per example. Generation is
  memory-bound: each decode step (batch_size examples at once) reads all weights, so a step takes
  weight bytes / (bandwidth x BANDWIDTH_UTILISATION);
- influence: per-example gradients cost 6 x N x tokens; TracIn takes them over train + eval at
  each of its `epochs` checkpoints; DataInf once; Kronfluence fits covariances and eigenvalue
  corrections (two passes over train) and then computes pairwise scores (one gradient pass over
  train + eval); eigendecompositions are negligible next to these passes;
- effective throughput = peak 16-bit tensor TFLOPS x MODEL_FLOPS_UTILISATION x the
  quantization's speed factor (bitsandbytes dequantizes on every matmul);
- model load = 16-bit weight bytes / LOAD_BYTES_PER_S (Hugging Face cache on a volume);
- cold start per provider: COLD_START_S (RunPod 30-120 s, Modal 20-60 s; midpoints).
"""

from __future__ import annotations

import math

from cost_model.memory import MemoryBreakdown
from cost_model.model_catalog import ModelCard
from cost_model.prices import GpuOffer
from cost_model.workload import Workload

MODEL_FLOPS_UTILISATION = 0.30
BANDWIDTH_UTILISATION = 0.6
QUANTIZATION_SPEED: dict[str, float] = {"none": 1.0, "8bit": 0.35, "4bit": 0.6}
LOAD_BYTES_PER_S = 0.5e9
PIPELINE_OVERHEAD_S = 10.0
COLD_START_S: dict[str, float] = {"local": 0.0, "modal": 40.0, "runpod": 75.0}
COLD_START_RANGE: dict[str, str] = {"local": "none", "modal": "20-60 s", "runpod": "30-120 s"}
EVAL_RUNS = 3


def influence_flops(params: float, workload: Workload) -> float:
    gradient_pass = 6 * params * (workload.train_tokens + workload.eval_tokens)
    if workload.influence_method == "tracin":
        return workload.epochs * gradient_pass
    if workload.influence_method == "datainf":
        return gradient_pass
    return 2 * 6 * params * workload.train_tokens + gradient_pass


def estimated_time_s(
    card: ModelCard, workload: Workload, memory: MemoryBreakdown, gpu: GpuOffer, provider: str
) -> float:
    params = card.params_b * 1e9
    train = 6 * params * workload.train_tokens * workload.epochs
    eval_forward = 2 * params * (2 * workload.eval_tokens + workload.few_shot_tokens)
    flops = train + eval_forward + influence_flops(params, workload)
    throughput = gpu.peak_tflops * 1e12 * MODEL_FLOPS_UTILISATION * QUANTIZATION_SPEED[workload.quantization]
    decode_steps = EVAL_RUNS * math.ceil(workload.n_eval / workload.batch_size) * workload.max_new_tokens
    step_s = memory.weights_gb * 1e9 / (gpu.memory_bandwidth_gbs * 1e9 * BANDWIDTH_UTILISATION)
    load_s = params * 2 / LOAD_BYTES_PER_S
    return COLD_START_S[provider] + load_s + flops / throughput + decode_steps * step_s + PIPELINE_OVERHEAD_S
