"""Estimate tests: GPU recommendation, cost = time x price, dated prices, catalog, overrides."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

import cost_model
from cost_model import CostEstimate, PriceTableError, Workload, estimate, lookup_model, recommend_gpu
from cost_model.memory import USABLE_FRACTION
from gpu_core.schemas import NO_SIZE_LIMITS, ExperimentSpec

ESTIMATE_FIELDS = [
    "backend",
    "provider",
    "gpu",
    "gpu_memory_gb",
    "required_memory_gb",
    "estimated_time_s",
    "usd_per_second",
    "estimated_cost_usd",
    "prices_as_of",
    "price_source",
    "notes",
    "gpu_seconds",
    "shards",
    "parallel_jobs",
]


def make_spec(
    model_id: str = "google/gemma-3-12b", quantization: str = "4bit", **overrides
) -> ExperimentSpec:
    return ExperimentSpec.model_validate(
        {
            "model_id": model_id,
            "training_data": [
                {"prompt": f"Question {i}: what is {i} plus {i}? ", "completion": f"{2 * i}"}
                for i in range(200)
            ],
            "eval_data": [{"prompt": f"What is {i} plus 1? ", "expected": f"{i + 1}"} for i in range(20)],
            "hyperparams": {"quantization": quantization},
            **overrides,
        }
    )


def test_12b_in_4bit_gets_at_least_24gb_and_fits() -> None:
    recommendation = recommend_gpu(12, "4bit")
    assert recommendation.tier_gb >= 24
    assert recommendation.fits
    assert recommendation.required_memory_gb <= USABLE_FRACTION * recommendation.tier_gb


def test_12b_in_16bit_gets_the_48gb_class_and_long_sequences_more() -> None:
    recommendation = recommend_gpu(12, "none")
    assert recommendation.tier_gb == 48
    assert recommendation.fits
    # 16-bit weights alone are 24 GB: the breakdown must show them.
    assert recommendation.breakdown.weights_gb == pytest.approx(24, rel=0.01)
    # Activations and labelled-position logits grow with the sequence: 2,048 tokens need 80 GB.
    long = recommend_gpu(12, "none", workload=Workload(max_seq_len=2048))
    assert long.tier_gb == 80 and long.breakdown.activations_gb > 7 * recommendation.breakdown.activations_gb


def test_the_runtime_configuration_is_what_is_priced() -> None:
    """sdpa unless the architecture needs eager attention; checkpointed training and influence
    passes that halve their micro-batch, so one example's pass is what must fit."""
    from cost_model.memory import activation_bytes

    gemma = lookup_model("google/gemma-3-12b").architecture
    workload = Workload(max_seq_len=2048, batch_size=8)
    sdpa = activation_bytes(gemma, workload)
    eager = activation_bytes(gemma.model_copy(update={"eager_attention": True}), workload)
    layers, d, tokens = gemma.num_layers, gemma.hidden_size, 8 * 2048
    logits = 10 * tokens * gemma.vocab_size
    checkpointed_training = layers * 2 * tokens * d + 34 * tokens * d
    one_influence_example = layers * 34 * 2048 * d
    assert sdpa - logits == pytest.approx(max(checkpointed_training, one_influence_example), rel=1e-9)
    # Eager attention keeps batch x heads x seq^2 scores: one layer's in checkpointed training,
    # every layer's in an influence example's pass.
    scores = 5 * gemma.num_heads * 2048**2
    with_scores = max(checkpointed_training + 8 * scores, one_influence_example + layers * scores)
    assert eager - logits == pytest.approx(with_scores, rel=1e-9) and eager > sdpa
    # Without checkpointing and micro-batch halving the batch's activations would be 8 x larger.
    assert sdpa - logits <= layers * 34 * tokens * d / 4


def test_quantization_and_influence_method_change_the_memory() -> None:
    gemma = lookup_model("google/gemma-3-12b").architecture
    sizes = {
        q: recommend_gpu(12.2, q, architecture=gemma).required_memory_gb for q in ("none", "8bit", "4bit")
    }
    assert sizes["none"] > sizes["8bit"] > sizes["4bit"]
    tracin = recommend_gpu(12.2, "4bit", architecture=gemma, workload=Workload(influence_method="tracin"))
    ekfac = recommend_gpu(12.2, "4bit", architecture=gemma, workload=Workload(influence_method="kronfluence"))
    # EK-FAC factors grow with d_in^2 + d_out^2 per LoRA module: gigabytes on a 12B model.
    assert ekfac.breakdown.influence_gb - tracin.breakdown.influence_gb > 5


def test_a_model_too_big_for_every_tier_does_not_fit() -> None:
    recommendation = recommend_gpu(120, "none")
    assert recommendation.tier_gb == 141
    assert not recommendation.fits


@pytest.mark.parametrize(
    ("provider", "backend"), [("modal", "hosted"), ("runpod", "runpod"), ("local", "hosted")]
)
def test_cost_is_time_times_price_and_prices_carry_their_date(provider: str, backend: str) -> None:
    result = estimate(make_spec(), provider, backend)
    assert result.provider == provider and result.backend == backend
    assert result.estimated_cost_usd == pytest.approx(
        result.estimated_time_s * result.usd_per_second, abs=1e-6
    )
    assert len(result.prices_as_of) == 10 and result.prices_as_of[4] == "-"
    assert result.price_source
    if provider == "local":
        assert result.estimated_cost_usd == 0
    else:
        assert result.usd_per_second > 0 and result.estimated_cost_usd > 0
        assert result.gpu_memory_gb >= 16 and result.required_memory_gb <= result.gpu_memory_gb


def test_same_tier_on_both_backends_mapped_to_each_providers_gpu() -> None:
    # Gemma 3 12B in 16-bit at 4,096 tokens: the 80 GB class.
    long = {"hyperparams": {"quantization": "none", "max_seq_len": 4096}}
    modal = estimate(make_spec(**long), "modal", "hosted")
    runpod = estimate(make_spec(**long), "runpod", "runpod")
    assert (modal.gpu, runpod.gpu) == ("A100-80GB", "AMPERE_80")
    assert modal.required_memory_gb == runpod.required_memory_gb


def test_estimate_has_exactly_the_proto_fields() -> None:
    from influence.v1 import common_pb2

    proto_fields = [f.name for f in common_pb2.Estimate.DESCRIPTOR.fields]
    assert [f.name for f in dataclasses.fields(CostEstimate)] == proto_fields == ESTIMATE_FIELDS
    payload = estimate(make_spec(), "modal", "hosted").as_dict()
    common_pb2.Estimate(**payload)  # every value has the proto's type
    assert isinstance(payload["notes"], list)


def test_time_grows_with_epochs_data_and_model_size() -> None:
    base = estimate(make_spec(), "modal", "hosted").estimated_time_s
    more_epochs = estimate(
        make_spec(hyperparams={"quantization": "4bit", "epochs": 9}), "modal", "hosted"
    ).estimated_time_s
    smaller = estimate(make_spec("Qwen/Qwen2.5-1.5B", "none"), "modal", "hosted").estimated_time_s
    assert more_epochs > base > smaller
    # A cold start is always part of the estimate on a cloud.
    assert smaller > cost_model.timing.COLD_START_S["modal"]


def test_influence_methods_cost_differently_on_the_same_gpu() -> None:
    def run(method: str) -> CostEstimate:
        return estimate(make_spec("Qwen/Qwen2.5-0.5B", "none", influence_method=method), "runpod", "runpod")

    datainf, tracin, kronfluence = run("datainf"), run("tracin"), run("kronfluence")
    assert datainf.gpu == tracin.gpu == kronfluence.gpu
    # TracIn repeats the gradient pass at each of 3 checkpoints (its last feeds the training-set
    # summary); Kronfluence adds 2 fitting passes and, like DataInf, the summary's own pass.
    assert min(tracin.estimated_time_s, kronfluence.estimated_time_s) > datainf.estimated_time_s


def test_unknown_provider_or_backend_is_named() -> None:
    with pytest.raises(ValueError, match="unknown provider 'aws'"):
        estimate(make_spec(), "aws", "hosted")
    with pytest.raises(ValueError, match="unknown backend 'cloud'"):
        estimate(make_spec(), "modal", "cloud")


def test_aliases_and_unknown_model_ids() -> None:
    assert lookup_model("google/gemma-3-12b-it").id == "google/gemma-3-12b"
    assert lookup_model("QWEN/qwen2.5-7b-instruct").params_b == pytest.approx(7.62)
    sized = lookup_model("acme/super-llm-13B-chat")
    assert (sized.params_b, sized.known) == (13.0, False)
    assert "13B read from its id" in sized.note
    assert lookup_model("acme/tiny-270m").params_b == pytest.approx(0.27)
    unsized = lookup_model("acme/mystery")
    assert unsized.params_b == cost_model.model_catalog.UNKNOWN_MODEL_PARAMS_B
    assert "assumed" in unsized.note
    result = estimate(make_spec("acme/mystery"), "modal", "hosted")
    assert any("not in the catalog" in note for note in result.notes)


def test_tiny_model_counts_one_token_per_byte() -> None:
    card = lookup_model("local/tiny-llama")
    spec = make_spec("local/tiny-llama", "none")
    workload = Workload.from_spec(spec, card)
    expected = sum(min(len(t.prompt + t.completion), 256) for t in spec.training_data)
    assert workload.train_tokens == expected


def test_catalog_lists_the_gemma_family_with_recommendations_and_prices() -> None:
    models = {m.id: m for m in cost_model.catalog()}
    for size in ("1b", "4b", "12b", "27b"):
        assert f"google/gemma-3-{size}" in models
    assert {"Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-14B", "meta-llama/Llama-3.1-8B", "local/tiny-llama"} <= set(
        models
    )
    gemma = models["google/gemma-3-12b"].as_dict()
    assert gemma["params_b"] == pytest.approx(12.2) and gemma["default_quantization"] == "4bit"
    assert gemma["recommended_tier_gb"] >= 24 and gemma["fits"]
    hosted, runpod = gemma["prices"]["hosted"], gemma["prices"]["runpod"]
    assert hosted["provider"] == "modal" and runpod["provider"] == "runpod"
    for price in (hosted, runpod):
        assert price["usd_per_hour"] == pytest.approx(price["usd_per_second"] * 3600)
        assert price["gpu_memory_gb"] >= gemma["recommended_tier_gb"]
    json.dumps([m.as_dict() for m in models.values()])


def test_operator_overrides_prices_with_a_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    gpu = estimate(make_spec(), "modal", "hosted").gpu
    shipped = json.loads(Path(cost_model.prices.price_file("modal")).read_text())
    shipped["as_of"] = "2027-01-01"
    assert shipped["gpus"][gpu]["usd_per_second"] != 0.001
    shipped["gpus"][gpu]["usd_per_second"] = 0.001
    (tmp_path / "modal.json").write_text(json.dumps(shipped))
    monkeypatch.setenv("COST_MODEL_PRICES_DIR", str(tmp_path))
    result = estimate(make_spec(), "modal", "hosted")
    assert (result.gpu, result.usd_per_second, result.prices_as_of) == (gpu, 0.001, "2027-01-01")
    # runpod.json is absent from the directory: the shipped table stays.
    assert estimate(make_spec(), "runpod", "runpod").prices_as_of == "2026-06-08"


def test_a_bad_price_file_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    bad = tmp_path / "runpod.json"
    shipped = json.loads(Path(cost_model.prices.price_file("runpod")).read_text())
    shipped["tiers"]["80"] = "AMPERE_48"
    bad.write_text(json.dumps(shipped))
    monkeypatch.setenv("COST_MODEL_RUNPOD_PRICES", str(bad))
    with pytest.raises(
        PriceTableError, match=r"runpod.json is invalid: .*tiers\[80\] names 'AMPERE_48' with only 48 GB"
    ):
        estimate(make_spec(), "runpod", "runpod")
    monkeypatch.setenv("COST_MODEL_RUNPOD_PRICES", str(tmp_path / "missing.json"))
    with pytest.raises(PriceTableError, match="not readable"):
        estimate(make_spec(), "runpod", "runpod")


def test_time_grows_with_the_examples_of_every_stage() -> None:
    """The tiny model on this host: the number of examples, not FLOPs, sets the time."""
    from gpu_core.schemas import parse_spec

    def spec(n_train: int, n_eval: int, **hyperparams: object) -> dict:
        return {
            "training_data": [{"prompt": f"{i} =", "completion": f" {i}"} for i in range(n_train)],
            "eval_data": [{"prompt": f"{i} =", "expected": f" {i}"} for i in range(n_eval)],
            "hyperparams": {"epochs": 1, "max_new_tokens": 1, **hyperparams},
            "few_shot_k": 0,
        }

    def seconds(n_train: int, n_eval: int, **hyperparams: object) -> float:
        return estimate(parse_spec(spec(n_train, n_eval, **hyperparams)), "local", "hosted").estimated_time_s

    small = seconds(100, 10)
    assert seconds(10_000, 10) > small + 60  # training and influence per training example
    assert seconds(100, 1_000) > small + 10  # three eval runs and influence per eval example
    assert seconds(100, 1_000, max_new_tokens=32) > seconds(100, 1_000) + 30  # generation steps
    assert seconds(100, 10, epochs=5) > small + 1  # TracIn's checkpoints and every epoch


def test_trackstar_and_projection_are_costed() -> None:
    def run(method: str, **influence) -> CostEstimate:
        spec = make_spec("Qwen/Qwen2.5-0.5B", "none", influence_method=method)
        spec.influence = spec.influence.model_copy(update=influence)
        return estimate(spec, "runpod", "runpod")

    tracin, trackstar, datainf = run("tracin"), run("trackstar"), run("datainf")
    # TrackStar: one gradient pass (the final checkpoint) plus the scoring, not TracIn's three.
    assert max(datainf.estimated_time_s, trackstar.estimated_time_s) < tracin.estimated_time_s
    workload = Workload(influence_method="trackstar", n_train=100_000, n_eval=1000)
    scoring = 2 * 1000 * 100_000 * 4096
    datainf_workload = dataclasses.replace(workload, influence_method="datainf")
    # DataInf adds the training-set summary's own gradient pass; TrackStar and TracIn hand it
    # the final adapter's gradients from theirs and add one pass over the eval set only.
    summary = cost_model.timing.SUMMARY_PASS_FLOPS_PER_TOKEN * 1e9 * workload.train_tokens
    eval_summary = cost_model.timing.SUMMARY_PASS_FLOPS_PER_TOKEN * 1e9 * workload.eval_tokens
    gradient_pass = cost_model.timing.influence_flops(1e9, datainf_workload) - summary
    assert cost_model.timing.influence_flops(1e9, workload) == pytest.approx(
        gradient_pass + scoring + eval_summary
    )
    projected = dataclasses.replace(workload, influence_method="tracin", projection_dim=1024)
    assert cost_model.timing.influence_flops(1e9, projected) == pytest.approx(
        workload.epochs * (gradient_pass + 2 * 1000 * 100_000 * 1024) + eval_summary
    )


def test_projection_keeps_influence_memory_flat_in_eval_size() -> None:
    arch = lookup_model("google/gemma-3-12b").architecture

    def influence_gb(n_eval: int, projection_dim: int | None, method: str = "tracin") -> float:
        workload = Workload(
            influence_method=method, projection_dim=projection_dim, n_eval=n_eval, n_train=100_000
        )
        return recommend_gpu(12.2, "4bit", architecture=arch, workload=workload).breakdown.influence_gb

    # Exact TracIn caches a full LoRA gradient per eval example; projected rows are k floats.
    assert influence_gb(1000, None) > 10 * influence_gb(1000, 4096)
    assert influence_gb(1000, 4096) - influence_gb(10, 4096) < 0.1
    assert influence_gb(1000, None, "trackstar") == influence_gb(1000, 4096, "trackstar")


def test_a_counterfactual_check_costs_its_retrainings_on_the_experiments_gpu() -> None:
    from gpu_core.schemas import CounterfactualRequest

    spec = make_spec()
    experiment = estimate(spec, "runpod", "runpod")
    one = estimate(spec, "runpod", "runpod", CounterfactualRequest(controls=0, eval_ids=["a"]))
    three = estimate(spec, "runpod", "runpod", CounterfactualRequest(controls=2, eval_ids=["a"]))
    with_lds = estimate(spec, "runpod", "runpod", CounterfactualRequest(controls=2, lds_subsets=4))
    assert one.gpu == three.gpu == experiment.gpu
    # Each retraining adds the same training time; one cold start and model load in all.
    per_retraining = (three.estimated_time_s - one.estimated_time_s) / 2
    assert per_retraining > 0 and one.estimated_time_s > per_retraining
    assert with_lds.estimated_time_s > three.estimated_time_s + 3 * per_retraining
    assert three.estimated_cost_usd == pytest.approx(three.estimated_time_s * three.usd_per_second, rel=1e-6)
    assert "3 retrainings (1 without the top-k, 2 random controls, 0 LDS subsets)" in three.notes[0]
    # No influence pass: one retraining costs less than the whole experiment.
    assert one.estimated_time_s < experiment.estimated_time_s


def test_every_fitting_gpu_cheapest_first() -> None:
    from cost_model import price_table

    table = price_table("runpod")
    names = [name for name, _ in table.gpus_for_tier(48)]
    assert names[0] == "AMPERE_48" and "AMPERE_24" not in names and "HOPPER_141" in names
    prices = [offer.usd_per_second for _, offer in table.gpus_for_tier(48)]
    assert prices == sorted(prices)
    assert [name for name, _ in table.gpus_for_tier(141)] == ["HOPPER_141", "BLACKWELL_180"]


def test_a_pinned_revision_is_the_same_catalog_model() -> None:
    from cost_model import lookup_model

    assert lookup_model("Qwen/Qwen2.5-0.5B@main") == lookup_model("Qwen/Qwen2.5-0.5B")
    assert lookup_model("Qwen/Qwen2.5-0.5B@main").known


def test_a_query_job_costs_far_less_than_the_experiment_and_grows_with_its_queries() -> None:
    from cost_model import estimate_job
    from gpu_core.jobs import JobInputError

    def queries(n: int, expected: bool = True) -> bytes:
        items = [
            {"prompt": f"What is {i} plus 2? ", **({"expected": f"{i + 2}"} if expected else {})}
            for i in range(n)
        ]
        return json.dumps({"queries": items}).encode()

    for method, source in (("tracin", "recomputed training gradients"), ("trackstar", "its gradient index")):
        spec = make_spec(influence_method=method)
        experiment = estimate(spec, "runpod", "runpod")
        one = estimate_job(spec, "runpod", "runpod", "query", queries(1))
        many = estimate_job(spec, "runpod", "runpod", "query", queries(32))
        assert one.gpu == many.gpu == experiment.gpu
        assert one.estimated_time_s < many.estimated_time_s < experiment.estimated_time_s
        assert f"1 queries scored against 200 training examples with {method} from {source}" in one.notes[0]
    spec = make_spec(influence_method="trackstar")
    # Without expected answers the targets are generated: more tokens, more time.
    assert (
        estimate_job(spec, "runpod", "runpod", "query", queries(32, expected=False)).estimated_time_s
        > estimate_job(spec, "runpod", "runpod", "query", queries(32)).estimated_time_s
    )
    with pytest.raises(JobInputError, match="^queries: List should have at least 1 item"):
        estimate_job(spec, "runpod", "runpod", "query", b'{"queries": []}')


def test_a_merge_prices_the_16_bit_base_and_a_4_bit_12b_merges_through_host_memory() -> None:
    from gpu_core.merge_schemas import MergeRequest

    four_bit = make_spec(model_id="google/gemma-3-12b", quantization="4bit")
    experiment = estimate(four_bit, "runpod", "runpod")
    merged = estimate(four_bit, "runpod", "runpod", merge=MergeRequest())
    # Same GPU as the experiment (a 16 GB card); the 24 GB of bf16 weights do not fit it.
    assert merged.gpu == experiment.gpu and merged.gpu_memory_gb < 24
    assert merged.required_memory_gb == pytest.approx(12.2 * 2 + 1.5, abs=0.5)
    assert any("merged onto the 16-bit base" in note for note in merged.notes)
    assert any("merged in host memory" in note for note in merged.notes)
    assert any("writes 24.4 GB of merged weights (16-bit) in 5 shard(s)" in note for note in merged.notes)
    # A 16-bit experiment's GPU (48 GB class) holds them: no host-memory merge, and faster.
    sixteen = estimate(make_spec(quantization="none"), "runpod", "runpod", merge=MergeRequest())
    assert sixteen.gpu_memory_gb >= 48 and not any("host memory" in note for note in sixteen.notes)
    assert sixteen.estimated_time_s < merged.estimated_time_s
    # Reading, writing, uploading and reading back 24 GB: minutes.
    assert 120 < merged.estimated_time_s < 1800
    assert merged.estimated_cost_usd == pytest.approx(
        merged.estimated_time_s * merged.usd_per_second, rel=1e-6
    )


def test_sharded_estimate_counts_every_jobs_overhead() -> None:
    """N shards: shorter wall time while the parallel jobs last, more GPU-seconds (each shard's
    cold start, model load and checkpoint download), priced by GPU-seconds."""
    training = [
        {"prompt": f"Question {i}: what is {i} plus {i}? ", "completion": f"{2 * i}"} for i in range(50_000)
    ]

    def sharded(shards: object, parallel: int | None = None, n_train: int = 10_000) -> CostEstimate:
        spec = ExperimentSpec.model_validate(
            {
                **make_spec().model_dump(exclude_none=True),
                "training_data": training[:n_train],
                "influence_method": "trackstar",
                "influence": {"shards": shards},
            },
            context={"limits": NO_SIZE_LIMITS},
        )
        return estimate(spec, "runpod", "runpod", parallel_jobs=parallel)

    one, two, four = sharded(1), sharded(2, 4), sharded(4, 4)
    assert one.shards == 1 and one.gpu_seconds == one.estimated_time_s
    assert (two.shards, four.shards) == (2, 4)
    assert one.estimated_time_s > two.estimated_time_s > four.estimated_time_s
    assert one.gpu_seconds < two.gpu_seconds < four.gpu_seconds
    assert four.estimated_cost_usd == pytest.approx(four.gpu_seconds * four.usd_per_second, rel=1e-6)
    assert any("per-job overhead" in note and "4 index shards" in note for note in four.notes)
    # Four shards, two workers: two rounds of shards, slower than four at once.
    assert sharded(4, 2).estimated_time_s > four.estimated_time_s
    # On 200 examples a shard's overhead outweighs its share: slower, and "auto" does not shard.
    assert sharded(2, 4, n_train=200).estimated_time_s > sharded(1, n_train=200).estimated_time_s
    assert sharded("auto", 4, n_train=200).shards == 1
    assert sharded("auto", 4).shards == 2  # one shard per 5,000 examples at least
    # The jobs at once the shards and wall time were counted from travel with the estimate.
    assert (sharded("auto", 1).shards, sharded("auto", 1).parallel_jobs, four.parallel_jobs) == (1, 1, 4)


def test_a_config_json_sizes_a_model_whatever_its_name_says() -> None:
    qwen_05b = {
        "hidden_size": 896,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "intermediate_size": 4864,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    }
    # Qwen2.5-0.5B has 494M parameters (its model card), of which 136M are the tied embedding.
    assert cost_model.card_from_config("me/x-70B", qwen_05b).params_b == pytest.approx(0.494, abs=0.001)
    # A multimodal config's text model; experts multiply the MLP (Mixtral 8x7B: 46.7B).
    mixtral = {
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 14336,
        "vocab_size": 32000,
        "tie_word_embeddings": False,
        "num_local_experts": 8,
    }
    card = cost_model.card_from_config("me/tiny-1B", {"text_config": mixtral})
    assert card.params_b == pytest.approx(46.7, abs=0.1) and card.default_quantization == "4bit"
    assert "counted from its config.json" in card.note
    with pytest.raises(ValueError, match="does not describe a decoder \\(no 'hidden_size'\\)"):
        cost_model.card_from_config("me/x", {"model_type": "vit"})
