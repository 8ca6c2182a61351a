"""The projected gradient index: CountSketch projection, index files, block scoring, TrackStar,
projected TracIn, flat memory in n_train, and the index as a pipeline artifact."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import gc
import json
import re
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from benchmarks.toy import ToySetup, build_toy_setup
from gpu_core.influence import compute_influence
from gpu_core.influence.gradients import lora_layers, lora_state
from gpu_core.influence.index import GradientIndex, GradientIndexWriter
from gpu_core.influence.projected import (
    RunningTopK,
    build_gradient_index,
    plan_checkpoints,
    score_blocks,
)
from gpu_core.influence.projection import CountSketchProjection
from gpu_core.influence_methods import influence_method
from gpu_core.schemas import InfluenceOptions

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def toy() -> ToySetup:
    """96 train x 8 queries, LoRA r=8 on q/v (d = 3,584), 3 checkpoints with Adam moments."""
    return build_toy_setup(96, 8, steps_per_epoch=2)


def test_projection_is_seeded_and_deterministic() -> None:
    sizes = [512, 512, 256]
    gradients = torch.randn(4, sum(sizes), generator=torch.Generator().manual_seed(0))
    first = CountSketchProjection(sizes, 128, seed=3).project(gradients)
    again = CountSketchProjection(sizes, 128, seed=3).project(gradients)
    other = CountSketchProjection(sizes, 128, seed=4).project(gradients)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    # Each coordinate lands in one bucket with a sign: the projection is linear and keeps
    # the sum of absolute values of a one-hot vector.
    one_hot = torch.zeros(1, sum(sizes))
    one_hot[0, 700] = 2.5
    projected = CountSketchProjection(sizes, 128, seed=3).project(one_hot)
    assert projected.abs().sum() == pytest.approx(2.5) and int((projected != 0).sum()) == 1


def test_projected_inner_products_approximate_exact_ones() -> None:
    """Unbiased with variance (|x|^2 |y|^2 + <x,y>^2 - 2 sum x_j^2 y_j^2) / k: over 200 seeds the
    mean error is within 4 standard errors and the spread matches the formula within 25%."""
    generator = torch.Generator().manual_seed(0)
    d, k = 3584, 256
    x = torch.randn(d, generator=generator, dtype=torch.float64)
    y = 0.6 * x + 0.8 * torch.randn(d, generator=generator, dtype=torch.float64)
    exact = float(x @ y)
    variance = float((x @ x) * (y @ y) + exact**2 - 2 * (x.square() * y.square()).sum()) / k
    estimates = torch.tensor(
        [
            float(
                (p := CountSketchProjection([1024, 2560], k, seed)).project(x[None].float())[0].double()
                @ p.project(y[None].float())[0].double()
            )
            for seed in range(200)
        ]
    )
    assert abs(float(estimates.mean()) - exact) < 4 * (variance / 200) ** 0.5
    assert float(estimates.var()) == pytest.approx(variance, rel=0.25)


def test_projected_tracin_ranks_like_exact_tracin(toy: ToySetup, tmp_path: Path) -> None:
    exact = compute_influence(
        "tracin",
        toy.model,
        toy.tokenizer,
        toy.train,
        toy.queries,
        toy.checkpoints,
        InfluenceOptions(),
        32,
        tmp_path,
    )
    projected = compute_influence(
        "tracin",
        toy.model,
        toy.tokenizer,
        toy.train,
        toy.queries,
        toy.checkpoints,
        InfluenceOptions(projection_dim=2048),
        32,
        tmp_path,
    )
    correlations = [spearmanr(projected[i], exact[i]).statistic for i in range(len(exact))]
    assert sum(correlations) / len(correlations) >= 0.95
    assert float((projected - exact).abs().max() / exact.abs().max()) < 0.2
    # The final adapter is back in place.
    final = toy.checkpoints[-1].state
    assert all(torch.equal(layer.module.weight, final[layer.param_name]) for layer in lora_layers(toy.model))


def test_index_files_manifest_and_rows(toy: ToySetup, tmp_path: Path) -> None:
    ids = [f"train-{i}" for i in range(len(toy.train))]
    scores = compute_influence(
        "trackstar",
        toy.model,
        toy.tokenizer,
        toy.train,
        toy.queries,
        toy.checkpoints,
        InfluenceOptions(projection_dim=256, projection_seed=7),
        32,
        tmp_path,
        train_ids=ids,
        index_dir=tmp_path / "index",
    )
    index = GradientIndex.open(tmp_path / "index")
    manifest = index.manifest
    assert manifest["method"] == "trackstar" and manifest["dim"] == 256 and manifest["dtype"] == "float16"
    assert manifest["projection"]["kind"] == "countsketch" and manifest["projection"]["seed"] == 7
    assert manifest["projection"]["input_dim"] == 3584 and len(manifest["projection"]["layers"]) == 8
    assert [(c.epoch, c.weight) for c in index.checkpoints] == [(3, 1.0)]  # the final checkpoint
    assert re.fullmatch(r"[0-9a-f]{64}", manifest["fingerprint"])
    assert index.ids() == ids
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == sorted(p.name for p in index.files())
    shard = np.load(index.directory / index.checkpoints[0].shards[0].file, mmap_mode="r")
    assert shard.dtype == np.float16 and shard.shape == (96, 256)
    rows = torch.cat([block for _, block in index.blocks(0, block_rows=40)])
    assert torch.linalg.vector_norm(rows, dim=1).sub(1).abs().max() < 1e-3  # unit rows
    # TrackStar scores are cosines and the eval example's top-1 is stable under the fp16 rows.
    assert scores.abs().max() <= 1.0 + 1e-3
    # A different adapter gives a different fingerprint.
    other = GradientIndexWriter(
        tmp_path / "other", method="trackstar", ids=ids, dim=256, projection={}, model_fingerprint="x"
    )
    assert other.manifest["fingerprint"] != manifest["fingerprint"]


def test_block_scores_and_running_top_k_match_the_full_matrix(toy: ToySetup, tmp_path: Path) -> None:
    layers = lora_layers(toy.model)
    plans = plan_checkpoints(influence_method("tracin"), layers, toy.checkpoints, torch.device("cpu"))
    index = build_gradient_index(
        toy.model,
        toy.tokenizer.pad_token_id,
        toy.train,
        [str(i) for i in range(96)],
        plans,
        influence_method("tracin"),
        512,
        0,
        32,
        tmp_path / "index",
        lambda _done: None,
    )
    eval_rows = [torch.randn(8, 512, generator=torch.Generator().manual_seed(c)) for c in range(3)]
    full = torch.cat([block for _, block in score_blocks(index, eval_rows, block_rows=1000)], dim=1)
    # Float64 products rounded to float32 (score_blocks' arithmetic), then weighted.
    expected = sum(
        c.weight
        * (rows.double() @ torch.cat([b for _, b in index.blocks(i, 1000)]).double().T).float().double()
        for i, (c, rows) in enumerate(zip(index.checkpoints, eval_rows, strict=True))
    )
    assert torch.allclose(full, expected, rtol=1e-6, atol=0)
    tracker = RunningTopK(8, k=5)
    blocks = list(score_blocks(index, eval_rows, block_rows=7))
    assert [start for start, _ in blocks] == list(range(0, 96, 7))
    for start, block in blocks:
        tracker.update(start, block)
    top = torch.sort(full, dim=1, descending=True, stable=True)
    bottom = torch.sort(full, dim=1, stable=True)
    assert torch.equal(tracker.top_indices, top.indices[:, :5])
    assert torch.equal(tracker.bottom_indices, bottom.indices[:, :5])
    # Blocks of another size score alike (a sharded index relies on it): rounded float64 sums.
    assert torch.equal(tracker.top_values, top.values[:, :5])


def test_running_top_k_keeps_training_order_on_ties() -> None:
    tracker = RunningTopK(1, k=3)
    tracker.update(0, torch.tensor([[1.0, 2.0]], dtype=torch.float64))
    tracker.update(2, torch.tensor([[2.0, 1.0, 2.0]], dtype=torch.float64))
    assert tracker.top_indices.tolist() == [[1, 2, 4]]
    assert tracker.bottom_indices.tolist() == [[0, 3, 1]]


def test_trackstar_needs_the_optimizer_second_moments(toy: ToySetup, tmp_path: Path) -> None:
    from gpu_core.influence import AdapterCheckpoint

    bare = [AdapterCheckpoint(lora_state(lora_layers(toy.model)), learning_rate=1.0, epoch=1)]
    with pytest.raises(ValueError, match="trackstar needs the training's Adam second moments"):
        compute_influence(
            "trackstar",
            toy.model,
            toy.tokenizer,
            toy.train,
            toy.queries,
            bare,
            InfluenceOptions(),
            32,
            tmp_path,
        )


def _peak_rss_kib() -> int:
    return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def _rss_kib() -> int:
    return int(re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


@pytest.mark.parametrize("method", ["tracin", "trackstar"])
def test_index_build_memory_is_flat_in_n_train(method: str, tmp_path: Path) -> None:
    """Building the index over 2,048 rather than 256 examples: at k = 4,096 keeping the rows
    would be 8 KiB (fp16) per example and checkpoint, the gradients 14 KiB (fp32), 14-75 MiB more
    here. The Python-level peak (tracemalloc, numpy included) may grow only by the cyclic garbage
    of the forward passes that the collector has not reached yet (measured ~75 B per example and
    checkpoint), bounded here at 512 B (1/16 of a row); the resident peak (torch's allocations
    too) by allocator noise."""
    setup = build_toy_setup(2048, 4, steps_per_epoch=1)
    layers = lora_layers(setup.model)
    plans = plan_checkpoints(influence_method(method), layers, setup.checkpoints, torch.device("cpu"))

    def measure(n: int) -> tuple[int, int]:
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        rss_before = _rss_kib()
        tracemalloc.start()
        build_gradient_index(
            setup.model,
            setup.tokenizer.pad_token_id,
            setup.train[:n],
            [f"t{i}" for i in range(n)],
            plans,
            influence_method(method),
            4096,
            0,
            32,
            tmp_path / f"index-{n}",
            lambda _done: None,
        )
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return peak, (_peak_rss_kib() - rss_before) * 1024

    measure(256)  # warm-up: allocator pools and caches
    small_python, small_rss = measure(256)
    large_python, large_rss = measure(2048)
    extra = 2048 - 256
    print(f"\n{method}: python peak {small_python} -> {large_python} B, rss {small_rss} -> {large_rss} B")
    assert large_python - small_python < extra * len(plans) * 512
    assert large_rss - small_rss < 8 << 20


def test_pipeline_writes_the_index_and_second_moments_as_artifacts(
    make_spec: Callable[..., Any], tmp_path: Path
) -> None:
    from gpu_core.pipeline import run_experiment_to_result

    spec = make_spec(n_train=24, n_eval=6, method="trackstar", epochs=2)
    spec.influence = spec.influence.model_copy(update={"projection_dim": 512})
    artifacts = tmp_path / "artifacts"
    result = run_experiment_to_result(spec, artifacts)
    assert result.influence.method == "trackstar"
    assert len(result.influence.scores) == 6 and len(result.influence.scores[0]) == 24
    index = GradientIndex.open(artifacts / "gradient_index")
    assert index.ids() == [example.id for example in spec.training_data]
    # scores.npy, written block by block while scoring, is the result's matrix in float32.
    stored = np.load(artifacts / "scores.npy")
    assert stored.dtype == np.float32 and stored.shape == (6, 24)
    assert np.allclose(stored, np.asarray(result.influence.scores), rtol=1e-6, atol=1e-7)
    assert "scores.npy" in {artifact.name for artifact in result.artifacts}
    assert index.dim == 512 and index.n_examples == 24
    listing = json.loads((artifacts / "checkpoints" / "checkpoints.json").read_text())["checkpoints"]
    assert [entry["second_moment_file"] for entry in listing] == [
        "epoch-1.second-moment.safetensors",
        "epoch-2.second-moment.safetensors",
    ]
    from safetensors.torch import load_file

    moments = load_file(str(artifacts / "checkpoints" / "epoch-2.second-moment.safetensors"))
    assert moments and all(bool((value >= 0).all()) and bool((value > 0).any()) for value in moments.values())


def test_scores_file_written_block_by_block_equals_the_matrix(tmp_path: Path) -> None:
    from gpu_core.influence.projected import ScoresFileWriter

    matrix = torch.randn(5, 23, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    writer = ScoresFileWriter(tmp_path / "scores.npy", 5, 23)
    for start in (14, 0, 7):  # any order: each block lands at its columns
        writer.write(start, matrix[:, start : start + 7 if start < 14 else 23])
    writer.close()
    stored = np.load(tmp_path / "scores.npy")
    assert stored.dtype == np.float32 and stored.shape == (5, 23)
    assert np.array_equal(stored, matrix.numpy().astype(np.float32))


def test_streamed_top_k_and_scores_file_without_the_full_matrix(toy: ToySetup, tmp_path: Path) -> None:
    from gpu_core.influence.projected import projected_scores

    common = (
        influence_method("trackstar"),
        toy.model,
        toy.tokenizer.pad_token_id,
        toy.train,
        [str(i) for i in range(96)],
        toy.queries,
        toy.checkpoints,
        512,
        0,
        32,
    )
    full = projected_scores(*common, tmp_path / "a", lambda _f: None).full
    streamed = projected_scores(
        *common, tmp_path / "b", lambda _f: None, keep_full=False, top_k=4, scores_file=tmp_path / "s.npy"
    )
    assert streamed.full is None
    expected_top = torch.sort(full, dim=1, descending=True, stable=True).indices[:, :4]
    assert torch.equal(streamed.top.top_indices, expected_top)
    assert np.allclose(np.load(tmp_path / "s.npy"), full.numpy(), atol=1e-6)
