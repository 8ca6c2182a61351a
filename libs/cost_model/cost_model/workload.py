"""What an experiment asks of the GPU, reduced to the numbers the memory and time formulas use."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cost_model.model_catalog import ModelCard
from gpu_core.influence_methods import InfluenceMethodEntry, influence_method
from gpu_core.schemas import (
    EvalExample,
    ExperimentSpec,
    Hyperparams,
    InfluenceMethod,
    Quantization,
    StoredDataset,
    TrainingExample,
)

_DEFAULTS = Hyperparams()


@dataclass(frozen=True)
class Workload:
    quantization: Quantization = _DEFAULTS.quantization
    max_seq_len: int = _DEFAULTS.max_seq_len
    batch_size: int = _DEFAULTS.batch_size
    lora_r: int = _DEFAULTS.lora_r
    target_modules: tuple[str, ...] = tuple(_DEFAULTS.target_modules)
    epochs: int = _DEFAULTS.epochs
    max_new_tokens: int = _DEFAULTS.max_new_tokens
    influence_method: InfluenceMethod = "tracin"
    # influence.projection_dim; TrackStar projects to its default dimensions when it is None.
    projection_dim: int | None = None
    n_train: int = 100
    n_eval: int = 20
    train_tokens: int = 100 * _DEFAULTS.max_seq_len // 2  # summed over the training examples
    eval_tokens: int = 20 * _DEFAULTS.max_seq_len // 2  # summed over the eval examples (prompt + expected)
    few_shot_tokens: int = 20 * _DEFAULTS.max_seq_len  # summed over the few-shot prompts
    # Share of the training tokens that carry a label (the assistant's answers): the LM head
    # runs on those positions only (gpu_core.runtime), so the logits scale with it.
    labelled_fraction: float = 1.0

    @property
    def method(self) -> InfluenceMethodEntry:
        return influence_method(self.influence_method)

    @property
    def index_dim(self) -> int | None:
        """Dimensions of the projected gradient index, or None when the method builds none."""
        return self.method.index_dim(self.projection_dim)

    @property
    def index_checkpoints(self) -> int:
        """Checkpoints in the index: TracIn's every epoch, TrackStar's final one."""
        return self.method.checkpoints_scored(self.epochs)

    @classmethod
    def from_spec(cls, spec: ExperimentSpec, card: ModelCard) -> Workload:
        """Tokens are ``ceil(chars / chars_per_token)`` per example, capped at max_seq_len."""
        hp = spec.hyperparams

        def tokens(text: str) -> int:
            return min(math.ceil(len(text) / card.chars_per_token), hp.max_seq_len)

        n_train, train_tokens, answers, text_chars = _sizes(
            spec.training_data, spec.training_dataset, tokens, hp.max_seq_len, card
        )
        n_eval, eval_tokens, _, _ = _sizes(spec.eval_data, spec.eval_dataset, tokens, hp.max_seq_len, card)
        shots = min(spec.few_shot_k, n_train)
        mean_train = train_tokens / max(n_train, 1)
        # A few-shot prompt carries k training examples before the eval prompt; the model's
        # context caps it (a stored eval set: its mean prompt).
        evals = [tokens(e.text) for e in spec.eval_data] or [eval_tokens // max(n_eval, 1)] * n_eval
        few_shot = sum(min(t + math.ceil(shots * mean_train), card.context_length) for t in evals)
        return cls(
            quantization=hp.quantization,
            max_seq_len=hp.max_seq_len,
            batch_size=hp.batch_size,
            lora_r=hp.lora_r,
            target_modules=tuple(hp.target_modules),
            epochs=hp.epochs,
            max_new_tokens=hp.max_new_tokens,
            influence_method=spec.influence_method,
            projection_dim=spec.influence.projection_dim,
            n_train=n_train,
            n_eval=n_eval,
            train_tokens=train_tokens,
            eval_tokens=eval_tokens,
            few_shot_tokens=few_shot,
            labelled_fraction=min(1.0, answers / max(text_chars, 1)),
        )


def _sizes(
    inline: Sequence[TrainingExample | EvalExample],
    stored: StoredDataset | None,
    tokens: Callable[[str], int],
    max_seq_len: int,
    card: ModelCard,
) -> tuple[int, int, int, int]:
    """(examples, tokens, answer characters, text characters) of a list of examples. A stored
    dataset records only its sums (its upload counted them): its examples are taken at their
    mean length, capped at ``max_seq_len``, which can overestimate a skewed set's tokens."""
    if stored is None:
        answers = sum(len(c) for e in inline for role, c in e.turns if role == "assistant")
        token_sum = sum(tokens(e.text) for e in inline)
        return len(inline), token_sum, answers, sum(len(e.text) for e in inline)
    mean = min(math.ceil(stored.text_chars / stored.count / card.chars_per_token), max_seq_len)
    return stored.count, mean * stored.count, stored.answer_chars, stored.text_chars
