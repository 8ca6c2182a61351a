"""Merged weights: the ``merge`` job kind. The experiment's LoRA adapter is merged into its base
model (peft's ``merge_and_unload``) and the result written as a plain transformers folder
(``merged/``: safetensors shards and their index, config, generation config, tokenizer) that
loads with ``AutoModelForCausalLM.from_pretrained`` and no peft.

Steps:

1. The base is loaded in its checkpoint's own dtype (bf16 for most hub models, float32 for the
   built-in tiny ones), never quantized: an experiment that trained on a 4-bit base is merged
   onto the 16-bit base, and the result says so (a 4-bit base has no weights to add a delta to
   that a plain ``from_pretrained`` could read back).
2. Placement: on the GPU when the 16-bit weights fit in its free memory with a margin
   (:data:`GPU_MARGIN`), else in host memory on the CPU. Merging is one ``B @ A`` product and
   an add per adapted layer, cheap either way; what a CPU merge costs is host RAM (the whole
   16-bit model, 24 GB for a 12B model) and the slower read and write. So a 4-bit experiment
   that ran on a 24 GB GPU still merges there, through host memory.
3. The adapter (``adapter/`` of the experiment's files) is loaded and merged; the weights are
   written in shards of at most ``shard_size_mb`` (transformers' writer holds one shard at a
   time in host memory), then renamed to ``model-NNNNN.safetensors`` (names that could be
   planned before the shard count was known) with the index rewritten to match.
4. The model is freed and the files loaded back with ``from_pretrained`` (on the GPU, with
   ``device_map="auto"`` offloading to host memory what does not fit; else on the CPU), and
   every eval example's answer loss is computed as the experiment's evaluation computed it.
   Each must match the fine-tuned model's loss in the experiment within a tolerance set by the
   lower precision of the two runs (:data:`TOLERANCE`: 1e-4 relative in float32). A quantized
   experiment's losses are not expected to match; the difference is reported.

Peak memory: the base once in 16-bit (on the GPU or the host), plus one shard in host memory
while writing; the check loads the merged model again only after the first copy is freed.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import torch

from gpu_core.artifacts import collect_artifacts
from gpu_core.counterfactual import retraining_job
from gpu_core.data import batches
from gpu_core.evaluation import target_losses
from gpu_core.jobs import JobInputError
from gpu_core.merge_schemas import (
    MAX_MERGED_SHARDS,
    MERGED_DIR,
    MERGED_SIDE_FILES,
    SHARD_INDEX,
    SINGLE_SHARD,
    MergeCheck,
    MergeRequest,
    MergeResult,
    shard_name,
)
from gpu_core.pipeline import experiment_encoder
from gpu_core.runtime import (
    MODEL_CREATION_LOCK,
    free_memory,
    load_adapter,
    load_model,
    resolve_source,
    select_device,
)
from gpu_core.schemas import ExperimentResult, ExperimentSpec

ADAPTER_DIR = "adapter"
# The 16-bit base goes on the GPU when its weights take at most this share of the free memory
# (the rest: the merge's per-layer temporaries, the CUDA context, fragmentation).
GPU_MARGIN = 0.85
# Relative tolerance of the check by the lower precision of the experiment and the merge:
# float32 sums the same products in another order; a 16-bit merge rounds W + BA once more.
TOLERANCE: dict[torch.dtype, float] = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
_PRECISION = [torch.bfloat16, torch.float16, torch.float32]  # lowest first
MB = 1_000_000


def stored_dtype(config: Any) -> torch.dtype:
    """The dtype the checkpoint's weights are stored in (float32 when the config does not say)."""
    found = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(found, str):
        found = getattr(torch, found, None)
    return found if found in _PRECISION else torch.float32


def parameter_count(config: Any) -> int:
    """The model's parameters, counted on the meta device (nothing allocated); tied weights once."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    return sum(parameter.numel() for parameter in skeleton.parameters())


def merge_device(weight_bytes: int) -> torch.device:
    """The GPU when the 16-bit weights fit in :data:`GPU_MARGIN` of its free memory, else the CPU."""
    device = select_device()
    if device.type != "cuda":
        return device
    free, _total = torch.cuda.mem_get_info(device)
    return device if weight_bytes <= GPU_MARGIN * free else torch.device("cpu")


def check_tolerance(experiment_dtype: str, merged: torch.dtype, quantization: str) -> float | None:
    if quantization != "none":
        return None
    ran = getattr(torch, experiment_dtype, torch.float32)
    lowest = min((ran, merged), key=lambda dtype: _PRECISION.index(dtype) if dtype in _PRECISION else 2)
    return TOLERANCE.get(lowest, TOLERANCE[torch.float32])


def rename_shards(directory: Path) -> list[str]:
    """transformers' ``model-0000i-of-0000n`` shards as ``model-0000i`` (the index rewritten);
    returns the weight files. A single ``model.safetensors`` keeps its name."""
    index_path = directory / SHARD_INDEX
    if not index_path.is_file():
        return [SINGLE_SHARD]
    index = json.loads(index_path.read_text())
    renamed = {
        old: shard_name(number) for number, old in enumerate(sorted(set(index["weight_map"].values())), 1)
    }
    for old, new in renamed.items():
        (directory / old).rename(directory / new)
    index["weight_map"] = {key: renamed[file] for key, file in index["weight_map"].items()}
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True))
    return [*renamed.values(), SHARD_INDEX]


def host_peak_gb() -> float:
    """This process's peak resident memory (Linux reports kilobytes, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1e9 if sys.platform == "darwin" else 1e6)


def merge_adapter(
    spec: ExperimentSpec,
    result: ExperimentResult,
    request: MergeRequest,
    adapter_dir: Path,
    artifacts_dir: Path,
    report: Callable[[float, str], None],
) -> MergeResult:
    from transformers import AutoConfig

    timings: dict[str, float] = {}
    notes: list[str] = []
    quantization = spec.hyperparams.quantization
    started = time.monotonic()
    source, local = resolve_source(spec.model_id)
    common: dict[str, Any] = {"local_files_only": True} if local else {}
    if not local and "@" in source:
        source, common["revision"] = source.split("@", 1)
    config = AutoConfig.from_pretrained(source, **common)
    dtype = stored_dtype(config)
    parameters = parameter_count(config)
    weight_bytes = parameters * torch.finfo(dtype).bits // 8
    shard_bytes = int(request.shard_size_mb * MB)
    if -(-weight_bytes // shard_bytes) > MAX_MERGED_SHARDS:
        raise JobInputError(
            f"shard_size_mb: {request.shard_size_mb:g} MB would split the {weight_bytes / 1e9:.1f} GB of "
            f"merged weights into more than {MAX_MERGED_SHARDS} shards; choose at least "
            f"{weight_bytes / MAX_MERGED_SHARDS / MB:.0f}"
        )
    device = merge_device(weight_bytes)
    if quantization != "none":
        notes.append(
            f"the experiment trained on a {quantization} base; the adapter is merged onto the "
            f"{str(dtype).removeprefix('torch.')} base, so the merged model's losses differ from "
            "the experiment's by the quantization error"
        )
    if select_device().type == "cuda" and device.type == "cpu":
        notes.append(
            f"the {weight_bytes / 1e9:.1f} GB of {str(dtype).removeprefix('torch.')} weights do not fit "
            "the GPU's free memory: merged in host memory"
        )
    report(0.05, f"loading {spec.model_id} in {str(dtype).removeprefix('torch.')} on {device}")
    loaded = load_model(spec.model_id, "none", device, dtype=dtype)
    timings["loading_model"] = time.monotonic() - started

    started = time.monotonic()
    report(0.3, "merging the adapter into the base")
    model = load_adapter(loaded, adapter_dir).merge_and_unload(safe_merge=True)
    timings["merge"] = time.monotonic() - started

    started = time.monotonic()
    report(0.4, f"writing the merged weights in shards of at most {request.shard_size_mb:g} MB")
    out = artifacts_dir / MERGED_DIR
    model.config.use_cache = True  # load_model turned it off for training; a merged model generates
    model.save_pretrained(out, max_shard_size=shard_bytes)
    loaded.tokenizer.save_pretrained(out)
    weights = rename_shards(out)
    (out / "MERGED.md").write_text(merge_card(spec, dtype, notes))
    unexpected = sorted(
        path.name for path in out.iterdir() if path.name not in (*MERGED_SIDE_FILES, *weights)
    )
    if unexpected:
        raise RuntimeError(
            f"merge: transformers wrote files the job cannot deliver: {', '.join(unexpected)} "
            "(gpu_core.merge_schemas.MERGED_SIDE_FILES is out of date)"
        )
    del model, loaded
    free_memory()
    timings["write"] = time.monotonic() - started
    gpu_peak = torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None

    started = time.monotonic()
    report(0.7, "loading the merged files back and scoring the eval examples")
    # On the GPU whenever there is one: what does not fit it is streamed from host memory.
    check = check_merged(spec, result, out, dtype, select_device())
    timings["check"] = time.monotonic() - started

    peak = {"host": round(host_peak_gb(), 3)}
    if gpu_peak is not None:
        peak["gpu"] = round(max(gpu_peak, torch.cuda.max_memory_allocated() / 1e9), 3)
    return MergeResult(
        base_model=spec.model_id,
        dtype=str(dtype).removeprefix("torch."),
        experiment_quantization=quantization,
        merged_on=str(device),
        parameters=parameters,
        weight_bytes=sum((out / name).stat().st_size for name in weights if name != SHARD_INDEX),
        shards=sum(1 for name in weights if name != SHARD_INDEX),
        files=sorted(path.name for path in out.iterdir()),
        check=check,
        notes=notes,
        peak_memory_gb=peak,
        timings=timings,
        artifacts=collect_artifacts(artifacts_dir),
    )


def check_merged(
    spec: ExperimentSpec, result: ExperimentResult, folder: Path, dtype: torch.dtype, device: torch.device
) -> MergeCheck:
    """Load ``folder`` with plain transformers and compare each eval example's answer loss with
    the fine-tuned model's in ``result``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    placement: dict[str, Any]
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        # What does not fit the GPU stays in host memory and is moved in per layer (accelerate).
        placement = {
            "device_map": "auto",
            "max_memory": {device.index or 0: int(GPU_MARGIN * free), "cpu": "1TB"},
        }
    else:
        placement = {"device_map": {"": device}}
    with MODEL_CREATION_LOCK:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True, **placement)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    encoder = experiment_encoder(spec, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    first = next(model.parameters()).device
    merged: list[float] = []
    for chunk in batches(spec.eval_data, spec.hyperparams.batch_size):
        pairs = [encoder.encode(encoder.eval_turns(example.turns), last_only=True) for example in chunk]
        merged += target_losses(model, pairs, pad, first)
    del model
    free_memory()
    finetuned = {outcome.id: outcome.loss for outcome in result.eval_results.finetuned.examples}
    ids = [example.id or "" for example in spec.eval_data]
    expected = [finetuned[eval_id] for eval_id in ids]
    worst = max(
        (abs(got - want) / max(abs(want), 1e-12) for got, want in zip(merged, expected, strict=True)),
        default=0.0,
    )
    tolerance = check_tolerance(
        str(result.environment.get("dtype", "float32")), dtype, spec.hyperparams.quantization
    )
    return MergeCheck(
        eval_ids=ids,
        finetuned_losses=expected,
        merged_losses=merged,
        max_relative_difference=worst,
        tolerance=tolerance,
        passed=None if tolerance is None else worst <= tolerance,
    )


def merge_card(spec: ExperimentSpec, dtype: torch.dtype, notes: list[str]) -> str:
    hp = spec.hyperparams
    lines = [
        "# Merged weights",
        "",
        f"Base model `{spec.model_id}` with the experiment's LoRA adapter merged in "
        f"(r={hp.lora_r}, alpha={hp.lora_alpha}, targets {', '.join(hp.target_modules)}), "
        f"stored in {str(dtype).removeprefix('torch.')}.",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("merged")',
        'tokenizer = AutoTokenizer.from_pretrained("merged")',
        "```",
    ]
    return "\n".join([*lines, "", *(f"- {note}" for note in notes), ""])


def run_merge_job(
    spec: ExperimentSpec,
    result: ExperimentResult,
    request: MergeRequest,
    artifacts_dir: Path | None,
    parent_artifacts_dir: Path | None,
    should_stop: Callable[[], bool] | None = None,
) -> Generator[dict[str, Any], None, None]:
    """:func:`merge_adapter` as a job (stage ``merge``): the adapter is read from
    ``parent_artifacts_dir/adapter``; the files go under ``artifacts_dir/merged``."""
    adapter_dir = parent_artifacts_dir / ADAPTER_DIR if parent_artifacts_dir is not None else None
    if adapter_dir is None or not (adapter_dir / "adapter_config.json").is_file():
        raise JobInputError(
            "parent_artifacts: the experiment's adapter is no longer stored; nothing to merge"
        )
    if artifacts_dir is None:
        raise JobInputError("artifacts_dir: a merge job writes files and needs somewhere to put them")
    return retraining_job(
        "merge",
        spec,
        0,
        should_stop,
        lambda report: merge_adapter(spec, result, request, adapter_dir, artifacts_dir, report),
        opening=f"merging the adapter into {spec.model_id}",
    )
