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
  train + eval); eigendecompositions are negligible next to these passes; TrackStar takes them
  once (final checkpoint); a projected index (TrackStar, TracIn with projection_dim) adds the
  scoring, 2 x n_eval x n_train x k per index checkpoint;
- effective throughput = peak 16-bit tensor TFLOPS x MODEL_FLOPS_UTILISATION x the
  quantization's speed factor (bitsandbytes dequantizes on every matmul);
- model load = 16-bit weight bytes / LOAD_BYTES_PER_S (Hugging Face cache on a volume);
- cold start per provider: COLD_START_S (RunPod 30-120 s, Modal 20-60 s; midpoints);
- per-pass latency: every model pass (one batch's forward, backward or decode step) costs the
  GPU's ``pass_latency_s`` on top of its FLOPs, counted per stage from the number of examples:
  three eval runs of ceil(n_eval / batch) x (1 + max_new_tokens) passes, training of
  epochs x ceil(n_train / batch) x 3 (forward, backward, optimizer), influence of 3 passes per
  gradient batch over train + eval (TracIn at each epoch's checkpoint, DataInf and TrackStar once,
  Kronfluence two fitting passes over train plus one scoring pass). On the tiny model this term is the time.

A counterfactual check (gpu_core.counterfactual) is ``retrainings`` x (the training + one
evaluation of the checked eval examples, with their passes), after one cold start and model load.

A follow-up query job (gpu_core.query) is one cold start and model load, greedy generation of
each query's answer, the query gradients (a forward and backward over the query tokens at each
scored checkpoint) and the training side: scoring the stored projected index
(2 x n_queries x n_train x k per index checkpoint), or for the methods without one the
experiment's influence pass over the training set again (TracIn at each epoch's checkpoint,
DataInf once, Kronfluence's two fitting passes plus one). It assumes the stored adapter is
there (a missing one is retrained, which adds the experiment's training time).

A merged-weights job (gpu_core.merge) is one cold start, the 16-bit base loaded (whatever the
experiment's quantization), written back as shards (WRITE_BYTES_PER_S) and, on RunPod or Modal,
uploaded to the artifact store (UPLOAD_BYTES_PER_S), then loaded again and one loss forward over
the eval examples (the check). Where the 16-bit weights do not fit the GPU (a 4-bit experiment on
a 24 GB card), the merge runs in host memory and the check's forward streams the layers that do
not fit over PCIe (PCIE_BYTES_PER_S) once per batch.
A sharded experiment (``influence.shards`` N, gpu_core.sharding) is a training job (the
experiment without its influence stage), N index-shard jobs and a merge. Each shard job pays the
per-job overhead again: a cold start, the model load, the download of the adapter and checkpoints
(LoRA parameters x 4 bytes x (checkpoints + adapter + Adam second moments) at
CHECKPOINT_DOWNLOAD_BYTES_PER_S) and the pipeline overhead, then the influence stage of its slice
(1/N of the training set, all of the eval set: its eval gradients are recomputed per shard). The
merge downloads the score columns (n_eval x n_train float64) and writes scores.npy, at
MERGE_BYTES_PER_S, after a fixed MERGE_OVERHEAD_S. GPU-seconds are the sum of every job's; the
wall time is the training job, ceil(N / parallel) rounds of shards (``parallel``: the jobs the
backend runs at once) and the merge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

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
WRITE_BYTES_PER_S = 0.5e9
UPLOAD_BYTES_PER_S = 0.2e9
PCIE_BYTES_PER_S = 10e9


# The training-set summary (gpu_core.training_summary): one gradient pass over the training set
# at the final adapter (the losses from its forward), except for the methods whose own pass takes
# those gradients and hands them over; those take one over the eval set instead (the summed eval
# gradient their net influence is taken against).
SUMMARY_PASS_FLOPS_PER_TOKEN = 6
SUMMARY_PASSES_PER_BATCH = 3
SUMMARY_FROM_INFLUENCE_PASS = ("tracin", "trackstar")


def _summary_tokens(workload: Workload) -> int:
    """The tokens of the summary's own gradient pass: the eval set's or the training set's."""
    if workload.influence_method in SUMMARY_FROM_INFLUENCE_PASS:
        return workload.eval_tokens
    return workload.train_tokens


def _summary_batches(workload: Workload) -> int:
    n = workload.n_eval if workload.influence_method in SUMMARY_FROM_INFLUENCE_PASS else workload.n_train
    return math.ceil(n / workload.batch_size)


def influence_flops(params: float, workload: Workload) -> float:
    """The influence stage, the training-set summary's extra pass included."""
    summary = SUMMARY_PASS_FLOPS_PER_TOKEN * params * _summary_tokens(workload)
    gradient_pass = 6 * params * (workload.train_tokens + workload.eval_tokens)
    if workload.index_dim is not None:
        scoring = 2 * workload.n_eval * workload.n_train * workload.index_dim
        return summary + workload.index_checkpoints * (gradient_pass + scoring)
    if workload.influence_method == "tracin":
        return summary + workload.epochs * gradient_pass
    if workload.influence_method == "datainf":
        return summary + gradient_pass
    return summary + 2 * 6 * params * workload.train_tokens + gradient_pass


def model_passes(workload: Workload) -> int:
    """Model passes of the whole pipeline, stage by stage (see the module docstring)."""
    train_batches = math.ceil(workload.n_train / workload.batch_size)
    eval_batches = math.ceil(workload.n_eval / workload.batch_size)
    evaluation = EVAL_RUNS * eval_batches * (1 + workload.max_new_tokens)
    training = workload.epochs * train_batches * 3
    gradient_batches = train_batches + eval_batches
    if workload.index_dim is not None:  # TrackStar's final checkpoint, projected TracIn's epochs
        gradient_batches *= workload.index_checkpoints
    elif workload.influence_method == "tracin":
        gradient_batches *= workload.epochs
    elif workload.influence_method != "datainf":
        gradient_batches += 2 * train_batches
    summary = SUMMARY_PASSES_PER_BATCH * _summary_batches(workload)
    return evaluation + training + 3 * gradient_batches + summary


# Object store to a worker (presigned GET of the training job's files).
CHECKPOINT_DOWNLOAD_BYTES_PER_S = 0.2e9
MERGE_BYTES_PER_S = 0.2e9
MERGE_OVERHEAD_S = 5.0
# Files a shard downloads per LoRA parameter: fp32 checkpoints, the adapter, the second moments.
CHECKPOINT_BYTES_PER_PARAM = 4


def influence_passes(workload: Workload) -> int:
    """Model passes of the influence stage (its gradient batches and the summary's pass)."""
    train_batches = math.ceil(workload.n_train / workload.batch_size)
    eval_batches = math.ceil(workload.n_eval / workload.batch_size)
    gradient_batches = train_batches + eval_batches
    if workload.index_dim is not None:
        gradient_batches *= workload.index_checkpoints
    elif workload.influence_method == "tracin":
        gradient_batches *= workload.epochs
    elif workload.influence_method != "datainf":
        gradient_batches += 2 * train_batches
    return 3 * gradient_batches + SUMMARY_PASSES_PER_BATCH * _summary_batches(workload)


def influence_time_s(card: ModelCard, workload: Workload, gpu: GpuOffer) -> float:
    params = card.params_b * 1e9
    throughput = gpu.peak_tflops * 1e12 * MODEL_FLOPS_UTILISATION * QUANTIZATION_SPEED[workload.quantization]
    return influence_flops(params, workload) / throughput + influence_passes(workload) * gpu.pass_latency_s


@dataclass(frozen=True)
class ShardedTime:
    """Seconds of a sharded experiment's jobs (see the module docstring)."""

    shards: int
    parallel: int
    training_s: float
    shard_s: float  # one shard job, its overhead included
    shard_overhead_s: float  # of which: cold start, model load, checkpoint download, pipeline
    merge_s: float

    @property
    def gpu_seconds(self) -> float:
        return self.training_s + self.shards * self.shard_s + self.merge_s

    @property
    def wall_s(self) -> float:
        return self.training_s + math.ceil(self.shards / self.parallel) * self.shard_s + self.merge_s


def sharded_time_s(
    card: ModelCard,
    workload: Workload,
    memory: MemoryBreakdown,
    gpu: GpuOffer,
    provider: str,
    shards: int,
    parallel: int,
    lora_params: int,
) -> ShardedTime:
    whole = estimated_time_s(card, workload, memory, gpu, provider)
    training_s = whole - influence_time_s(card, workload, gpu)
    per_shard = replace(
        workload,
        n_train=math.ceil(workload.n_train / shards),
        train_tokens=math.ceil(workload.train_tokens / shards),
    )
    files = lora_params * CHECKPOINT_BYTES_PER_PARAM * (workload.epochs + 2)
    overhead_s = (
        COLD_START_S[provider]
        + card.params_b * 1e9 * 2 / LOAD_BYTES_PER_S
        + files / CHECKPOINT_DOWNLOAD_BYTES_PER_S
        + PIPELINE_OVERHEAD_S
    )
    merge_s = MERGE_OVERHEAD_S + workload.n_eval * workload.n_train * 8 * 2 / MERGE_BYTES_PER_S
    return ShardedTime(
        shards=shards,
        parallel=max(1, parallel),
        training_s=training_s,
        shard_s=overhead_s + influence_time_s(card, per_shard, gpu),
        shard_overhead_s=overhead_s,
        merge_s=merge_s,
    )


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
    passes_s = model_passes(workload) * gpu.pass_latency_s
    return (
        COLD_START_S[provider]
        + load_s
        + flops / throughput
        + decode_steps * step_s
        + passes_s
        + PIPELINE_OVERHEAD_S
    )


def counterfactual_time_s(
    card: ModelCard,
    workload: Workload,
    memory: MemoryBreakdown,
    gpu: GpuOffer,
    provider: str,
    retrainings: int,
    n_checked: int,
) -> float:
    params = card.params_b * 1e9
    train = 6 * params * workload.train_tokens * workload.epochs
    checked_tokens = workload.eval_tokens * n_checked / max(workload.n_eval, 1)
    throughput = gpu.peak_tflops * 1e12 * MODEL_FLOPS_UTILISATION * QUANTIZATION_SPEED[workload.quantization]
    step_s = memory.weights_gb * 1e9 / (gpu.memory_bandwidth_gbs * 1e9 * BANDWIDTH_UTILISATION)
    decode_s = math.ceil(n_checked / workload.batch_size) * workload.max_new_tokens * step_s
    training_passes = workload.epochs * math.ceil(workload.n_train / workload.batch_size) * 3
    eval_passes = math.ceil(n_checked / workload.batch_size) * (1 + workload.max_new_tokens)
    passes_s = (training_passes + eval_passes) * gpu.pass_latency_s
    per_retraining = (train + 2 * params * checked_tokens) / throughput + decode_s + passes_s
    load_s = params * 2 / LOAD_BYTES_PER_S
    return COLD_START_S[provider] + load_s + retrainings * per_retraining + PIPELINE_OVERHEAD_S


def merge_time_s(
    card: ModelCard, workload: Workload, gpu: GpuOffer, provider: str, offloaded_bytes: float
) -> float:
    """Seconds of a merge job; ``offloaded_bytes``: 16-bit weights that do not fit the GPU."""
    params = card.params_b * 1e9
    weight_bytes = params * 2
    throughput = gpu.peak_tflops * 1e12 * MODEL_FLOPS_UTILISATION
    batches = math.ceil(workload.n_eval / workload.batch_size)
    upload_s = weight_bytes / UPLOAD_BYTES_PER_S if provider != "local" else 0.0
    check_s = 2 * params * workload.eval_tokens / throughput + batches * gpu.pass_latency_s
    check_s += batches * offloaded_bytes / PCIE_BYTES_PER_S
    return (
        COLD_START_S[provider]
        + 2 * weight_bytes / LOAD_BYTES_PER_S
        + weight_bytes / WRITE_BYTES_PER_S
        + upload_s
        + check_s
        + PIPELINE_OVERHEAD_S
    )


def query_time_s(
    card: ModelCard,
    workload: Workload,
    memory: MemoryBreakdown,
    gpu: GpuOffer,
    provider: str,
    n_queries: int,
    query_tokens: int,
) -> float:
    """Seconds of a query job of ``n_queries`` queries, ``query_tokens`` summed over them."""
    params = card.params_b * 1e9
    throughput = gpu.peak_tflops * 1e12 * MODEL_FLOPS_UTILISATION * QUANTIZATION_SPEED[workload.quantization]
    step_s = memory.weights_gb * 1e9 / (gpu.memory_bandwidth_gbs * 1e9 * BANDWIDTH_UTILISATION)
    query_batches = math.ceil(n_queries / workload.batch_size)
    train_batches = math.ceil(workload.n_train / workload.batch_size)
    generation_s = query_batches * workload.max_new_tokens * step_s
    query_pass = 6 * params * query_tokens
    if workload.index_dim is not None:
        checkpoints = workload.index_checkpoints
        flops = checkpoints * (query_pass + 2 * n_queries * workload.n_train * workload.index_dim)
        gradient_batches = checkpoints * query_batches
    else:
        # The experiment's influence pass with the queries in place of its eval examples.
        flops = influence_flops(params, replace(workload, n_eval=n_queries, eval_tokens=query_tokens))
        gradient_batches = train_batches + query_batches
        if workload.influence_method == "tracin":
            gradient_batches *= workload.epochs
        elif workload.influence_method == "kronfluence":
            gradient_batches += 2 * train_batches
    # Generation (a prompt pass and a decode step per new token) and the loss forward per batch.
    passes = query_batches * (2 + workload.max_new_tokens) + 3 * gradient_batches
    load_s = params * 2 / LOAD_BYTES_PER_S
    return (
        COLD_START_S[provider]
        + load_s
        + 2 * params * query_tokens / throughput
        + flops / throughput
        + generation_s
        + passes * gpu.pass_latency_s
        + PIPELINE_OVERHEAD_S
    )
