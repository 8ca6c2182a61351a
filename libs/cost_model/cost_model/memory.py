"""GPU memory an experiment needs, and the smallest GPU tier that holds it.

required = overhead + weights + LoRA state + activations + influence extra, where (bytes):

- weights: (params - embeddings) x bytes/param of the quantization (none = 2 for bf16,
  8bit = 1.06, 4bit = 0.52 for NF4 with double-quantized constants) + embeddings/LM head x 2
  (bitsandbytes leaves them in 16-bit);
- LoRA state: LoRA params x 16 (fp32 weight, gradient and two Adam moments), with
  LoRA params = layers x sum over target modules of r x (in + out);
- activations, as gpu_core.runtime runs the model (``sdpa`` attention, gradient checkpointing in
  training, the LM head on labelled positions only). Training at max_seq_len x batch_size keeps
  each layer's 16-bit input (2 x tokens x hidden per layer) and recomputes one layer at a time
  (34 x tokens x hidden, Korthikanti et al. 2022). Influence passes run without checkpointing
  but halve their micro-batch until it fits, so one example's pass must fit (34 x seq x hidden
  per layer). The larger of the two, plus the logits of the labelled positions: 10 x tokens x
  labelled fraction x vocab (16-bit logits, fp32 copy and gradient; the fraction is the
  answers' share of the training text, 1 without a spec). Only an architecture that needs
  eager attention (``Architecture.eager_attention``) adds 5 x batch x heads x seq^2 per layer
  for the attention scores;
- influence extra (fp32): TracIn keeps one LoRA checkpoint per epoch and caches every eval
  example's LoRA gradient; DataInf holds the eval gradients and a chunk of DATAINF_CHUNK training
  gradients; Kronfluence holds EK-FAC factors, (in^2 + out^2) for each of a LoRA module's two
  factors (A: in -> r, B: r -> out), twice (covariances and eigenvectors), plus the eval gradients;
  with a projected gradient index (TrackStar; TracIn with projection_dim) the index is on disk,
  so the GPU holds the LoRA checkpoints it uses, the CountSketch (PROJECTION_BYTES_PER_PARAM: a
  column index, a sign and a row pointer share per LoRA parameter), TrackStar's second moments,
  one batch of gradients and the projected eval rows (n_eval x k per checkpoint);
- overhead: CUDA context, cuBLAS workspace and kernels, OVERHEAD_GB.

A tier fits when required <= USABLE_FRACTION x its memory (the rest absorbs allocator
fragmentation and the estimate's error). Tiers are the same on every provider; each price table
maps them to its own GPU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from cost_model.model_catalog import Architecture, architecture_for
from cost_model.prices import TIERS_GB
from cost_model.workload import Workload
from gpu_core.schemas import Quantization

GB = 1e9
BYTES_PER_PARAM: dict[str, float] = {"none": 2.0, "8bit": 1.06, "4bit": 0.52}
EMBEDDING_BYTES_PER_PARAM = 2.0
LORA_STATE_BYTES_PER_PARAM = 16
ACTIVATION_BYTES_PER_HIDDEN = 34
CHECKPOINT_BYTES_PER_HIDDEN = 2
ATTENTION_SCORE_BYTES = 5
LOGIT_BYTES_PER_ENTRY = 10
GRADIENT_BYTES_PER_PARAM = 4
DATAINF_CHUNK = 256
PROJECTION_BYTES_PER_PARAM = 12
OVERHEAD_GB = 1.5
USABLE_FRACTION = 0.9


@dataclass(frozen=True)
class MemoryBreakdown:
    weights_gb: float
    lora_state_gb: float
    activations_gb: float
    influence_gb: float
    overhead_gb: float

    @property
    def total_gb(self) -> float:
        return (
            self.weights_gb + self.lora_state_gb + self.activations_gb + self.influence_gb + self.overhead_gb
        )

    def as_dict(self) -> dict[str, float]:
        return {**{k: round(v, 3) for k, v in asdict(self).items()}, "total_gb": round(self.total_gb, 3)}


@dataclass(frozen=True)
class GpuRecommendation:
    tier_gb: int  # memory class of the recommended GPU
    required_memory_gb: float
    fits: bool  # False: even the largest tier is too small
    breakdown: MemoryBreakdown


def lora_params(arch: Architecture, lora_r: int, target_modules: tuple[str, ...]) -> int:
    per_layer = sum(lora_r * sum(arch.module_shape(name)) for name in target_modules)
    return arch.num_layers * per_layer


def activation_bytes(arch: Architecture, workload: Workload) -> float:
    """Peak activations of training (checkpointed) or of one influence example, plus logits."""
    seq, batch, d, layers = workload.max_seq_len, workload.batch_size, arch.hidden_size, arch.num_layers
    tokens = batch * seq

    def attention_scores(examples: int) -> float:
        return ATTENTION_SCORE_BYTES * examples * arch.num_heads * seq**2 if arch.eager_attention else 0.0

    training = (
        layers * CHECKPOINT_BYTES_PER_HIDDEN * tokens * d
        + ACTIVATION_BYTES_PER_HIDDEN * tokens * d
        + attention_scores(batch)
    )
    one_influence_example = layers * (ACTIVATION_BYTES_PER_HIDDEN * seq * d + attention_scores(1))
    labelled = tokens * workload.labelled_fraction
    return max(training, one_influence_example) + LOGIT_BYTES_PER_ENTRY * labelled * arch.vocab_size


def memory_breakdown(params_b: float, arch: Architecture, workload: Workload) -> MemoryBreakdown:
    params = params_b * 1e9
    embeddings = min(arch.embedding_params, params)
    weights = (params - embeddings) * BYTES_PER_PARAM[workload.quantization]
    weights += embeddings * EMBEDDING_BYTES_PER_PARAM
    n_lora = lora_params(arch, workload.lora_r, workload.target_modules)

    activations = activation_bytes(arch, workload)

    gradient = n_lora * GRADIENT_BYTES_PER_PARAM
    eval_gradients = workload.n_eval * gradient
    if workload.index_dim is not None:
        checkpoints = workload.index_checkpoints
        influence = (
            checkpoints * gradient
            + n_lora * PROJECTION_BYTES_PER_PARAM
            + (gradient if workload.method.adam_normalised else 0)  # sqrt(v) + eps
            + workload.batch_size * gradient
            + checkpoints * workload.n_eval * workload.index_dim * GRADIENT_BYTES_PER_PARAM
        )
    elif workload.influence_method == "tracin":
        influence = workload.epochs * gradient + eval_gradients + gradient
    elif workload.influence_method == "datainf":
        influence = eval_gradients + min(workload.n_train, DATAINF_CHUNK) * gradient
    else:
        factors = 0
        for name in workload.target_modules:
            d_in, d_out = arch.module_shape(name)
            factors += d_in**2 + 2 * workload.lora_r**2 + d_out**2
        influence = 2 * 4 * arch.num_layers * factors + eval_gradients

    return MemoryBreakdown(
        weights_gb=weights / GB,
        lora_state_gb=n_lora * LORA_STATE_BYTES_PER_PARAM / GB,
        activations_gb=activations / GB,
        influence_gb=influence / GB,
        overhead_gb=OVERHEAD_GB,
    )


def tier_for(required_gb: float) -> tuple[int, bool]:
    for tier in TIERS_GB:
        if required_gb <= USABLE_FRACTION * tier:
            return tier, True
    return TIERS_GB[-1], False


def recommend_gpu(
    params_b: float,
    quantization: Quantization,
    *,
    architecture: Architecture | None = None,
    workload: Workload | None = None,
) -> GpuRecommendation:
    """The smallest GPU tier holding a LoRA + influence experiment on a ``params_b`` model.

    ``workload`` defaults to the spec defaults (seq 256, batch 8, r 8 on q/v, 3 epochs, TracIn)
    with 100 training and 20 eval examples; its quantization is replaced by ``quantization``.
    """
    if params_b <= 0:
        raise ValueError(f"params_b must be positive, got {params_b}")
    if quantization not in BYTES_PER_PARAM:
        raise ValueError(
            f"unknown quantization {quantization!r}; expected one of {', '.join(BYTES_PER_PARAM)}"
        )
    arch = architecture or architecture_for(params_b)
    base = workload or Workload()
    if base.quantization != quantization:
        base = replace(base, quantization=quantization)
    breakdown = memory_breakdown(params_b, arch, base)
    tier, fits = tier_for(breakdown.total_gb)
    return GpuRecommendation(
        tier_gb=tier, required_memory_gb=breakdown.total_gb, fits=fits, breakdown=breakdown
    )
