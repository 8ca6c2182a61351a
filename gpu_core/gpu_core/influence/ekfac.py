"""Kronfluence (EK-FAC influence functions) on the LoRA weight matrices, through the
``kronfluence`` package.

Scale and sign: kronfluence's ``g_query^T (F + damping)^-1 g_train`` with the query loss as the
measurement is positive for helpful examples (up-weighting the training example lowers the query
loss); it is the derivative w.r.t. the weight of the example in the *mean* training loss, so we
divide it by ``n_train`` (kronfluence's FAQ): the first-order change of the query loss from one
more copy of the example. The Fisher is kronfluence's default true Fisher (labels sampled from
the model, seeded for reproducibility).

Memory: kronfluence works on the live model. ``prepare_model`` freezes every parameter and swaps
each tracked LoRA matrix for a ``TrackedModule`` that wraps the very same ``nn.Linear``;
:func:`tracked_in_place` undoes both on leaving (the original modules put back, every
``requires_grad`` and train/eval flag as it was), so no copy of the frozen base weights is made
and later stages see the model exactly as it was.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from kronfluence import Analyzer, Task, prepare_model
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.factor.config import FactorConfig
from kronfluence.module.tracked_module import TrackedModule
from kronfluence.utils.dataset import DataLoaderKwargs
from torch import nn
from torch.utils.data import Dataset

from gpu_core.data import IGNORE_INDEX, EncodedPair, collate
from gpu_core.influence.gradients import (
    layer_slices,
    lora_layers,
    model_device,
    stacked_gradients,
    summed_completion_loss,
)

# Fixed so that kronfluence's sampled Fisher labels, and so the scores, are reproducible.
SAMPLING_SEED = 0


class LoraLanguageModelingTask(Task):
    """Summed completion-token loss for training and as the query measurement; tracks only the
    LoRA matrices."""

    def __init__(self, tracked_modules: Sequence[str]) -> None:
        super().__init__()
        self._tracked_modules = list(tracked_modules)

    def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"]
        if sample:
            # True Fisher: draw every labelled token from the model's own prediction for it.
            with torch.no_grad():
                probabilities = torch.softmax(logits[:, :-1].detach().float(), dim=-1)
                drawn = torch.multinomial(probabilities.reshape(-1, probabilities.shape[-1]), 1)
                drawn = drawn.reshape(labels.shape[0], -1)
            targets = torch.where(labels[:, 1:] == IGNORE_INDEX, labels[:, 1:], drawn)
            labels = torch.cat([labels[:, :1], targets], dim=1)
        return summed_completion_loss(logits, labels)

    def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
        return self.compute_train_loss(batch, model, sample=False)

    def get_influence_tracked_modules(self) -> list[str]:
        return self._tracked_modules

    def get_attention_mask(self, batch: Any) -> torch.Tensor:
        return batch["attention_mask"]


class PairDataset(Dataset):
    def __init__(self, pairs: Sequence[EncodedPair]) -> None:
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> EncodedPair:
        return self.pairs[index]


def dtype_arguments(dtype: torch.dtype) -> tuple[dict[str, torch.dtype], dict[str, torch.dtype]]:
    """kronfluence's working dtypes for a model in ``dtype`` (its float32 defaults, or float64
    throughout for a float64 model)."""
    if dtype != torch.float64:
        return {}, {}
    factor = {
        name: torch.float64
        for name in (
            "activation_covariance_dtype",
            "gradient_covariance_dtype",
            "per_sample_gradient_dtype",
            "lambda_dtype",
        )
    }
    score = {
        name: torch.float64
        for name in (
            "per_sample_gradient_dtype",
            "precondition_dtype",
            "score_dtype",
            "query_gradient_svd_dtype",
        )
    }
    return factor, score


@contextlib.contextmanager
def _quiet_kronfluence() -> Iterator[None]:
    with warnings.catch_warnings():
        # kronfluence 1.0.1 builds a deprecated torch.cuda.amp.GradScaler on every call.
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*GradScaler.*")
        yield


def _score_arguments(damping: float | None, dtype: torch.dtype) -> ScoreArguments:
    return ScoreArguments(damping_factor=damping, **dtype_arguments(dtype)[1])


@contextlib.contextmanager
def tracked_in_place(model: nn.Module, task: Task) -> Iterator[nn.Module]:
    """``model`` prepared by kronfluence's ``prepare_model`` (tracked modules wrapped, every
    parameter frozen, eval mode), restored exactly on leaving, also after an error (kronfluence
    also clears the gradients it leaves in ``.grad``; they are put back too)."""
    requires_grad = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    buffer_requires_grad = [(b, b.requires_grad) for b in model.buffers()]
    training = [(m, m.training) for m in model.modules()]
    try:
        yield prepare_model(model, task)
    finally:
        wrapped = [(name, m) for name, m in model.named_modules() if isinstance(m, TrackedModule)]
        for name, tracked in wrapped:
            parent_name, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attribute, tracked.original_module)
        for parameter, flag, grad in requires_grad:
            parameter.requires_grad_(flag)
            parameter.grad = grad
        for buffer, flag in buffer_requires_grad:
            buffer.requires_grad = flag
        for module, flag in training:
            module.training = flag


@contextlib.contextmanager
def _fitted_analyzer(
    model: nn.Module,
    pad_token_id: int,
    train: Sequence[EncodedPair],
    batch_size: int,
    work_dir: Path,
    strategy: str,
    use_empirical_fisher: bool,
) -> Iterator[Analyzer]:
    """A kronfluence Analyzer on ``model`` (prepared in place) with its factors fitted on
    ``train`` (the sampled Fisher labels seeded); on leaving its files are removed and the
    model restored."""
    tracked = [layer.module_name for layer in lora_layers(model)]
    task = LoraLanguageModelingTask(tracked)
    factor_dtypes, _ = dtype_arguments(next(model.parameters()).dtype)
    output_dir = work_dir / f"kronfluence-{uuid.uuid4().hex}"
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, output_dir, ignore_errors=True)
        prepared = stack.enter_context(tracked_in_place(model, task))
        analyzer = Analyzer(
            analysis_name="lora",
            model=prepared,
            task=task,
            cpu=model_device(model).type == "cpu",
            log_level=logging.WARNING,
            disable_tqdm=True,
            output_dir=str(output_dir),
        )
        analyzer.set_dataloader_kwargs(
            DataLoaderKwargs(collate_fn=functools.partial(collate, pad_token_id=pad_token_id))
        )
        with _quiet_kronfluence(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(SAMPLING_SEED)
            analyzer.fit_all_factors(
                factors_name=strategy,
                dataset=PairDataset(train),
                per_device_batch_size=batch_size,
                factor_args=FactorArguments(
                    strategy=strategy, use_empirical_fisher=use_empirical_fisher, **factor_dtypes
                ),
                overwrite_output_dir=True,
            )
        yield analyzer


def kronfluence_scores(
    model: nn.Module,
    pad_token_id: int,
    train: Sequence[EncodedPair],
    queries: Sequence[EncodedPair],
    damping: float | None,
    batch_size: int,
    work_dir: Path,
    progress: Callable[[float], None],
    strategy: str = "ekfac",
    use_empirical_fisher: bool = False,
) -> torch.Tensor:
    """``[n_queries, n_train]`` float64, positive = helpful, divided by ``n_train``.

    ``damping`` is kronfluence's ``damping_factor``; None = its heuristic, 0.1 x the mean
    eigenvalue per module."""
    dtype = next(model.parameters()).dtype
    with _fitted_analyzer(
        model, pad_token_id, train, batch_size, work_dir, strategy, use_empirical_fisher
    ) as analyzer:
        progress(0.5)
        with _quiet_kronfluence():
            analyzer.compute_pairwise_scores(
                scores_name="pairwise",
                factors_name=strategy,
                query_dataset=PairDataset(queries),
                train_dataset=PairDataset(train),
                per_device_query_batch_size=batch_size,
                per_device_train_batch_size=batch_size,
                score_args=_score_arguments(damping, dtype),
                overwrite_output_dir=True,
            )
        scores = analyzer.load_pairwise_scores("pairwise")["all_modules"]
        progress(1.0)
        return scores.to(torch.float64) / len(train)


@dataclass(frozen=True)
class KronfluenceTrainSide:
    """The training side of Kronfluence's scores, kept in memory so that repeated queries only
    need their own gradients (``gpu_core.query`` keeps one per warm session): per LoRA matrix
    kronfluence's prepared preconditioner (eigenbases and damped inverse corrected eigenvalues,
    through its own ``FactorConfig.prepare``), and the per-example training gradients."""

    gradients: torch.Tensor  # [n_train, width], the model's device and dtype
    preconditioners: list[dict[str, Any]]  # per layer: kronfluence's prepared module storage
    strategy: str
    score_args: ScoreArguments

    @property
    def nbytes(self) -> int:
        tensors = [self.gradients] + [
            t for storage in self.preconditioners for t in storage.values() if isinstance(t, torch.Tensor)
        ]
        return sum(t.numel() * t.element_size() for t in tensors)

    def scores(
        self, model: nn.Module, pad_token_id: int, queries: Sequence[EncodedPair], batch_size: int
    ) -> torch.Tensor:
        """``[n_queries, n_train]`` float64, divided by ``n_train``: kronfluence's pairwise score
        ``(P g_query) . g_train`` with each query gradient preconditioned by kronfluence's own
        ``precondition_gradient``, as :func:`kronfluence_scores` computes them."""
        layers = lora_layers(model)
        config = FactorConfig.CONFIGS[self.strategy]
        args = self.score_args
        query_grads = stacked_gradients(model, layers, queries, pad_token_id, batch_size)
        preconditioned = []
        for layer, s, storage in zip(layers, layer_slices(layers), self.preconditioners, strict=True):
            # [n_queries, out, in], as kronfluence shapes a per-sample gradient.
            shaped = query_grads[:, s].to(args.precondition_dtype).reshape(-1, *layer.module.weight.shape)
            gradient = config.precondition_gradient(gradient=shaped, storage=storage)
            preconditioned.append(gradient.flatten(start_dim=1).to(args.score_dtype))
        scores = torch.cat(preconditioned, dim=1) @ self.gradients.to(args.score_dtype).T
        return scores.cpu().to(torch.float64) / self.gradients.shape[0]


def kronfluence_train_side(
    model: nn.Module,
    pad_token_id: int,
    train: Sequence[EncodedPair],
    damping: float | None,
    batch_size: int,
    work_dir: Path,
    progress: Callable[[float], None],
    strategy: str = "ekfac",
    use_empirical_fisher: bool = False,
) -> KronfluenceTrainSide:
    """Fits the factors as :func:`kronfluence_scores` does, prepares them for scoring, and
    takes the per-example training gradients (``len(train) x width`` in the model's dtype; the
    caller bounds it) in one more pass."""
    layers = lora_layers(model)
    score_args = _score_arguments(damping, next(model.parameters()).dtype)
    with _fitted_analyzer(
        model, pad_token_id, train, batch_size, work_dir, strategy, use_empirical_fisher
    ) as analyzer:
        factors = analyzer.load_all_factors(strategy)
    progress(0.5)
    config, device = FactorConfig.CONFIGS[strategy], model_device(model)
    preconditioners = []
    for layer in layers:
        storage = {name: by_module[layer.module_name] for name, by_module in factors.items()}
        config.prepare(storage=storage, score_args=score_args, device=device)
        preconditioners.append(storage)
    gradients = stacked_gradients(
        model, layers, train, pad_token_id, batch_size, lambda fraction: progress(0.5 + 0.5 * fraction)
    )
    return KronfluenceTrainSide(gradients, preconditioners, strategy, score_args)
