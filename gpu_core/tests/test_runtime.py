"""gpu_core.runtime on tiny models built in code: an image-text model (Gemma 3 shape) through
every method, a tokenizer without offsets, out-of-memory handling, throttled progress, sdpa
against eager, and per-example gradients under gradient checkpointing."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from gpu_core.influence import compute_influence
from gpu_core.influence.gradients import lora_grad_enabled, lora_layers, per_example_gradients
from gpu_core.pipeline import ProgressThrottle, _Experiment, run_experiment, run_experiment_to_result
from gpu_core.runtime import (
    LoraTargetError,
    OutOfMemory,
    attach_lora,
    gradient_checkpointing,
    length_sorted_batches,
    load_model,
)
from gpu_core.schemas import STAGES, ExperimentSpec, InfluenceOptions

pytestmark = pytest.mark.slow

METHODS = ("tracin", "trackstar", "datainf", "kronfluence")


def _save(directory: Path, model: Any, tokenizer: Any) -> Path:
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def gemma3_image_text_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init ``Gemma3ForConditionalGeneration`` (tiny text and vision towers) with the
    tiny byte-level tokenizer, saved and then loaded like any model directory."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig
    from transformers.models.gemma3.configuration_gemma3 import Gemma3TextConfig

    from gpu_core.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    special = {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    text = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        sliding_window=64,
        **special,
    )
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    config = Gemma3Config(
        text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4, **special
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Gemma3ForConditionalGeneration(config)
    return _save(tmp_path_factory.mktemp("gemma3-image-text"), model, tokenizer)


def _spec(make_spec: Callable[..., Any], model_id: str, method: str, **hyperparams: Any) -> ExperimentSpec:
    spec = make_spec(
        n_train=8, n_eval=3, method=method, epochs=1, batch_size=4, max_new_tokens=2, **hyperparams
    )
    return spec.model_copy(update={"model_id": model_id})


@pytest.mark.parametrize("method", METHODS)
def test_an_image_text_model_runs_every_method_on_its_language_model(
    gemma3_image_text_dir: Path, make_spec: Callable[..., Any], tmp_path: Path, method: str
) -> None:
    spec = _spec(make_spec, str(gemma3_image_text_dir), method)
    result = run_experiment_to_result(spec, tmp_path)
    scores = np.load(tmp_path / "scores.npy")
    assert scores.shape == (3, 8)
    assert np.isfinite(scores).all() and np.abs(scores).max() > 0
    assert result.influence.method == method
    # Only the language model's q/v projections were adapted: nothing of the vision tower.
    from safetensors.torch import load_file

    adapted = list(load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")))
    assert adapted and all("language_model" in name for name in adapted)
    assert not any("vision" in name for name in adapted)


def test_target_modules_naming_no_language_model_layer_is_refused_before_any_evaluation(
    gemma3_image_text_dir: Path, make_spec: Callable[..., Any]
) -> None:
    # The vision tower has fc1/out_proj layers; the language model has none of that name.
    spec = _spec(make_spec, str(gemma3_image_text_dir), "tracin", target_modules=["out_proj"])
    stages: list[str] = []
    with pytest.raises(LoraTargetError, match=r"hyperparams\.target_modules: none of \['out_proj'\]"):
        for event in run_experiment(spec):
            stages.append(event["stage"])
    assert set(stages) == {"loading_model"}


@pytest.fixture(scope="module")
def slow_tokenizer_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama shape behind ByT5's Python ("slow") byte tokenizer, which gives no
    character offsets, with a chat template."""
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = ByT5Tokenizer(extra_ids=0)
    tokenizer.chat_template = (
        "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    assert not tokenizer.is_fast
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    return _save(tmp_path_factory.mktemp("slow-tokenizer"), model, tokenizer)


def _chat_spec(model_dir: Path, method: str) -> ExperimentSpec:
    def conversation(i: int) -> dict[str, Any]:
        return {
            "messages": [
                {"role": "system", "content": "Copy the letter."},
                {"role": "user", "content": f"{'abcdefgh'[i % 8]}>"},
                {"role": "assistant", "content": "abcdefgh"[i % 8]},
            ]
        }

    return ExperimentSpec.model_validate(
        {
            "model_id": str(model_dir),
            "training_data": [conversation(i) for i in range(6)],
            "eval_data": [conversation(i) for i in range(2)],
            "hyperparams": {"epochs": 1, "batch_size": 3, "max_seq_len": 96, "max_new_tokens": 2},
            "template": "chat",
            "few_shot_k": 1,
            "influence_method": method,
        }
    )


@pytest.mark.parametrize("method", METHODS)
def test_a_tokenizer_without_offsets_runs_chat_data_token_by_token(
    slow_tokenizer_model_dir: Path, method: str
) -> None:
    spec = _chat_spec(slow_tokenizer_model_dir, method)
    result = run_experiment_to_result(spec)
    assert result.data.template == "chat"
    assert len(result.influence.train_ids) == 6
    # Only the assistant's letter and its end-of-turn token are labelled.
    loaded = load_model(str(slow_tokenizer_model_dir), device=torch.device("cpu"))
    from gpu_core.pipeline import experiment_encoder

    encoder = experiment_encoder(spec, loaded.tokenizer)
    pair = encoder.train_pair(spec.training_data[0])
    labelled = [token for token in pair.labels if token != -100]
    assert loaded.tokenizer.decode(labelled[:1]) == "a"
    assert labelled[1] == loaded.tokenizer.eos_token_id


def test_a_span_query_works_with_a_tokenizer_without_offsets(slow_tokenizer_model_dir: Path) -> None:
    from gpu_core.data import Encoder
    from gpu_core.query import span_pair

    tokenizer = load_model(str(slow_tokenizer_model_dir), device=torch.device("cpu")).tokenizer
    for template in ("raw", "chat"):
        encoder = Encoder(tokenizer, template, 128)  # type: ignore[arg-type]
        pair = span_pair(encoder, "say it", "hello world", (6, 11), "queries[0].span")
        labelled = [token for token in pair.labels if token != -100]
        assert tokenizer.decode(labelled) == "world"


# ---- out of memory ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy() -> Any:
    from benchmarks.toy import build_toy_setup

    return build_toy_setup(12, 4, dtype=torch.float64, lora_r=4, epochs=2, steps_per_epoch=2)


@contextlib.contextmanager
def out_of_memory_above(model: Any, tokens: int, seen: list[tuple[int, int]]) -> Iterator[None]:
    """A simulated CUDA out-of-memory: every forward of a batch of more than ``tokens`` padded
    tokens raises ``torch.cuda.OutOfMemoryError`` (``seen``: each batch's (examples, width))."""

    def hook(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        input_ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        seen.append(tuple(input_ids.shape))
        if input_ids.numel() > tokens:
            raise torch.cuda.OutOfMemoryError(f"simulated: {input_ids.numel()} tokens do not fit")

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@pytest.mark.parametrize(("method", "projection_dim"), [("tracin", None), ("trackstar", 64)])
def test_an_influence_pass_out_of_memory_halves_its_batch_and_completes(
    toy: Any, tmp_path: Path, method: str, projection_dim: int | None
) -> None:
    def scores(work_dir: Path) -> torch.Tensor:
        return compute_influence(
            method,
            toy.model,
            toy.tokenizer,
            toy.train,
            toy.queries,
            toy.checkpoints,
            InfluenceOptions(projection_dim=projection_dim),
            batch_size=8,
            work_dir=work_dir,
        )

    expected = scores(tmp_path / "fits")
    longest = max(len(pair.input_ids) for pair in [*toy.train, *toy.queries])
    seen: list[tuple[int, int]] = []
    try:
        with out_of_memory_above(toy.model, 2 * longest, seen):
            halved = scores(tmp_path / "halved")
        assert seen[0][0] * seen[0][1] > 2 * longest  # the first micro-batch ran out of memory
        failed = [shape for shape in seen if shape[0] * shape[1] > 2 * longest]
        assert 1 <= len(failed) <= 3  # halved until it fit, then remembered for later passes
        assert max(rows for rows, _ in seen if rows * _ <= 2 * longest) >= 2
        # Float64 gradients; the index's float16 rows round batch-dependent last bits.
        assert float((halved - expected).abs().max() / expected.abs().max()) < 1e-6
    finally:
        del toy.model._gpu_core_token_budget  # the fixture's model is shared


def test_one_example_that_does_not_fit_names_the_stage_and_what_to_change(toy: Any, tmp_path: Path) -> None:
    with out_of_memory_above(toy.model, 1, []), pytest.raises(OutOfMemory) as caught:
        compute_influence(
            "tracin",
            toy.model,
            toy.tokenizer,
            toy.train,
            toy.queries,
            toy.checkpoints,
            InfluenceOptions(),
            batch_size=4,
            work_dir=tmp_path,
        )
    del toy.model._gpu_core_token_budget  # halved down before giving up; the model is shared
    message = str(caught.value)
    assert message.startswith("influence: one example does not fit") and "max_seq_len" in message


def test_training_out_of_memory_stops_with_a_plain_message(make_spec: Callable[..., Any]) -> None:
    spec = make_spec(n_train=8, n_eval=2, epochs=1, batch_size=4, max_new_tokens=2)

    def hook(module: Any, _args: Any) -> None:
        if module.training and type(module).__name__.startswith("PeftModel"):
            raise torch.cuda.OutOfMemoryError("simulated")

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        with pytest.raises(OutOfMemory) as caught:
            run_experiment_to_result(spec)
    finally:
        handle.remove()
    message = str(caught.value)
    assert message.startswith("training: out of GPU memory on the CPU")
    assert "the cost model expected" in message and " GB" in message
    assert "hyperparams.batch_size" in message and "'4bit'" in message


# ---- progress ----------------------------------------------------------------------------------


class FakeClock:
    def __init__(self, step_s: float) -> None:
        self.now, self.step_s = 0.0, step_s

    def __call__(self) -> float:
        self.now += self.step_s
        return self.now


def test_fifty_thousand_training_steps_give_a_bounded_number_of_events(make_spec: Callable[..., Any]) -> None:
    import queue
    import threading

    handoff: queue.Queue[tuple[str, Any]] = queue.Queue()
    clock = FakeClock(0.001)  # a step every millisecond: 50 s of training
    experiment = _Experiment(
        make_spec(n_train=4, n_eval=1),
        None,
        handoff,
        threading.Event(),
        throttle=ProgressThrottle(clock=clock),
    )
    total = 50_000
    experiment.report("loading_model", 0.0, "loading")
    experiment.report("loading_model", 1.0, "loaded")
    for step in range(1, total + 1):
        experiment.report("training", step / total, f"step {step}/{total}", step=step, total_steps=total)
    experiment.report("influence", 0.0, "scoring")
    events = []
    while not handoff.empty():
        events.append(handoff.get_nowait()[1])
    training = [event for event in events if event["stage"] == "training"]
    assert len(training) <= 52  # one a second over 50 s, plus the first and the last
    assert training[0]["step"] == 1 and training[-1]["step"] == total
    assert [event["stage"] for event in events][:2] == ["loading_model", "loading_model"]
    assert events[-1]["stage"] == "influence"


def test_a_real_run_keeps_every_stage_change_and_last_event(make_spec: Callable[..., Any]) -> None:
    frozen = ProgressThrottle(clock=lambda: 0.0)  # no time passes: only the must-keep events
    spec = make_spec(n_train=16, n_eval=2, epochs=4, batch_size=1, max_new_tokens=2)  # 64 steps
    events = list(run_experiment(spec, throttle=frozen))
    progress = [event for event in events if event["type"] == "progress"]
    assert [event["stage"] for event in progress][0] == "loading_model"
    for stage in STAGES:
        mine = [event for event in progress if event["stage"] == stage]
        assert mine and mine[-1]["stage_progress"] == 1.0
    assert len([event for event in progress if event["stage"] == "training"]) <= 3
    assert events[-1]["type"] == "result"


# ---- numerics ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["tracin", "datainf"])
def test_sdpa_and_eager_attention_give_the_same_scores(
    make_spec: Callable[..., Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, method: str
) -> None:
    spec = make_spec(n_train=12, n_eval=4, method=method, epochs=1, batch_size=4, max_new_tokens=2)
    scores = {}
    for attention in ("sdpa", "eager"):
        monkeypatch.setenv("GPU_CORE_ATTENTION", attention)
        run_experiment_to_result(spec, tmp_path / attention)
        scores[attention] = np.load(tmp_path / attention / "scores.npy").astype(np.float64)
    assert np.abs(scores["sdpa"] - scores["eager"]).max() / np.abs(scores["eager"]).max() < 1e-4


def test_per_example_gradients_are_exact_under_gradient_checkpointing(toy: Any) -> None:
    from gpu_core.influence.gradients import collate_to

    layers = lora_layers(toy.model)
    batch = collate_to(toy.train[:6], toy.tokenizer.pad_token_id, torch.device("cpu"))
    runs: list[str] = []
    counter = layers[0].module.register_forward_hook(lambda *_: runs.append("forward"))
    with lora_grad_enabled(layers):
        plain = per_example_gradients(toy.model, layers, batch)
        assert len(runs) == 1
        toy.model.train()  # checkpointing recomputes only in training mode (LoRA dropout is 0)
        try:
            with gradient_checkpointing(toy.model, True):
                checkpointed = per_example_gradients(toy.model, layers, batch)
        finally:
            toy.model.eval()
            counter.remove()
    assert len(runs) == 3  # the checkpointed pass ran the layer twice: forward, then recomputed
    assert float((checkpointed - plain).abs().max() / plain.abs().max()) < 1e-12


def test_length_sorted_batches_cover_every_example_once_longest_first() -> None:
    lengths = [5, 40, 12, 40, 7, 33, 1, 20]
    batches = length_sorted_batches(lengths, batch_size=3)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    assert [len(batch) for batch in batches] == [3, 3, 2]
    assert [[lengths[i] for i in batch] for batch in batches] == [[40, 40, 33], [20, 12, 7], [5, 1]]


def test_the_runtime_loads_with_sdpa_without_cache_and_adapts_only_lora(
    make_spec: Callable[..., Any],
) -> None:
    loaded = load_model("local/tiny-llama", device=torch.device("cpu"))
    assert loaded.config.attention == "sdpa" and loaded.dtype == torch.float32
    assert loaded.model.config.use_cache is False
    assert not loaded.config.gradient_checkpointing  # on GPUs only
    model = attach_lora(loaded, make_spec().hyperparams)
    adapted = {name.split(".lora_")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_" in name for name, p in model.named_parameters() if p.requires_grad)
    assert {name.rsplit(".", 1)[-1] for name in adapted} == {"q_proj", "v_proj"} and len(adapted) == 4
