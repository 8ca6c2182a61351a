"""Models created in threads of one process at once (compute-modal's in-process backend runs each
job as a thread: a sharded experiment's two index shards load the model and their adapter
together) come out as a load alone makes them: transformers' from_pretrained switches torch's
initialisers off and puts new parameters on the meta device process-wide while it loads, which
without ``runtime.MODEL_CREATION_LOCK`` left another thread's model with meta, uninitialised or
newly initialised weights (NaN scores in the merged TrackStar matrix, seen in
tests/e2e/test_sharded_providers.py)."""

from __future__ import annotations

import threading
from typing import Any

import torch

from gpu_core.runtime import attach_lora, load_model
from gpu_core.schemas import Hyperparams


def _created() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the base model's tensors, the fresh LoRA A matrices) of one load with an adapter."""
    model = attach_lora(load_model("local/tiny-llama"), Hyperparams())
    base: dict[str, torch.Tensor] = {}
    lora: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if "lora_A" in name:
            lora[name] = tensor
        elif "lora_" not in name:
            base[name.replace("base_model.model.", "").replace(".base_layer", "")] = tensor
    return base, lora


def _created_into(made: list[Any]) -> None:
    made.append(_created())


def test_models_created_in_threads_at_once_equal_one_created_alone() -> None:
    alone, _ = _created()
    for _attempt in range(2):
        made: list[Any] = []
        threads = [threading.Thread(target=_created_into, args=(made,)) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(made) == 3
        for base, lora in made:
            assert set(base) == set(alone)
            for name, tensor in base.items():
                assert not tensor.is_meta, name
                assert torch.equal(tensor, alone[name]), name
            for name, tensor in lora.items():  # LoRA A is initialised at random (B at zero)
                assert not tensor.is_meta and torch.isfinite(tensor).all() and tensor.abs().sum() > 0, name
