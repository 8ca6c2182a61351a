"""What an experiment ran on, recorded in its result so figures can be compared."""

from __future__ import annotations

import os
import platform
from typing import Any

import torch


def describe_environment(device: torch.device, dtype: torch.dtype, quantization: str) -> dict[str, Any]:
    import peft
    import transformers

    environment: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "quantization": quantization,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu_name": None,
        "cuda": torch.version.cuda,
    }
    if device.type == "cuda":
        environment["gpu_name"] = torch.cuda.get_device_name(device)
    return environment
