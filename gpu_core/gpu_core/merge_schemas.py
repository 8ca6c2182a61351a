"""The merged-weights job's request and result (gpu_core.merge runs it), and the names of the
files it may write. No torch: the scheduler plans upload URLs and the gateway validates
requests with it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from gpu_core.schemas import ArtifactEntry

MERGED_DIR = "merged"
DEFAULT_SHARD_SIZE_MB = 5000.0  # transformers' classic default (5 GB): a 12B model in bf16 is 5 shards
# At most this many weight shards (each gets an upload URL before the job runs); a model that
# would need more at the chosen shard size is refused before anything is written.
MAX_MERGED_SHARDS = 128
# What transformers' save_pretrained may write next to the weights (config, generation config,
# every tokenizer format it knows), and the job's own note. A file outside this list cannot be
# uploaded from RunPod or Modal, so gpu_core.merge refuses to write one (a test checks the tiny
# models' files are listed).
MERGED_SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "preprocessor_config.json",
    "processor_config.json",
    "MERGED.md",
)
SINGLE_SHARD = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"


def shard_name(number: int) -> str:
    """The ``number``-th weight shard (from 1). Not transformers' ``-of-N`` names: the names are
    planned (and upload URLs minted) before the shard count is known; the index maps to them."""
    return f"model-{number:05d}.safetensors"


def planned_merge_names() -> list[str]:
    """Every name a merge job may write, under ``merged/``."""
    names = [*MERGED_SIDE_FILES, SINGLE_SHARD, SHARD_INDEX]
    names += [shard_name(number) for number in range(1, MAX_MERGED_SHARDS + 1)]
    return [f"{MERGED_DIR}/{name}" for name in names]


class MergeRequest(BaseModel):
    """Merge the experiment's adapter into its base model (``merge_and_unload``) and write the
    merged weights as safetensors shards of at most ``shard_size_mb`` megabytes (10^6 bytes)."""

    model_config = ConfigDict(extra="forbid")

    shard_size_mb: float = Field(default=DEFAULT_SHARD_SIZE_MB, ge=0.1, le=50_000)


class MergeCheck(BaseModel):
    """The merged files loaded back with ``from_pretrained`` and scored on the experiment's eval
    examples: each example's mean answer loss next to the fine-tuned model's in the experiment.
    ``tolerance`` None: no match is expected (the experiment trained on a quantized base, the
    merge is onto the 16-bit one), so ``passed`` is None and the difference is only reported."""

    eval_ids: list[str]
    finetuned_losses: list[float]
    merged_losses: list[float]
    max_relative_difference: float
    tolerance: float | None
    passed: bool | None


class MergeResult(BaseModel):
    base_model: str
    dtype: str  # the merged weights' dtype (the base checkpoint's own)
    experiment_quantization: Literal["none", "8bit", "4bit"]
    merged_on: str  # the device the merge ran on: a GPU when the 16-bit base fits, else "cpu"
    parameters: int
    weight_bytes: int
    shards: int
    files: list[str]  # every file under merged/, a folder that loads with from_pretrained
    check: MergeCheck
    notes: list[str]
    peak_memory_gb: dict[str, float]  # "gpu" (allocated) where one was used, "host" (RSS)
    timings: dict[str, float]
    artifacts: list[ArtifactEntry] = Field(default_factory=list)
