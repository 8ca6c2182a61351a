"""The real cost of a finished job: device names matched to the price tables' GPUs, priced."""

from __future__ import annotations

import pytest

from cost_model import actual_cost, match_device, price_table


@pytest.mark.parametrize(
    ("provider", "device", "gpu"),
    [
        ("runpod", "NVIDIA A100 80GB PCIe", "AMPERE_80"),
        ("runpod", "NVIDIA A100-SXM4-80GB", "AMPERE_80"),
        ("runpod", "NVIDIA GeForce RTX 4090", "ADA_24"),
        ("runpod", "NVIDIA L40S", "ADA_48_PRO"),
        ("runpod", "NVIDIA RTX A6000", "AMPERE_48"),
        ("modal", "Tesla T4", "T4"),
        ("modal", "NVIDIA L4", "L4"),
        ("modal", "NVIDIA A10", "A10"),
        ("modal", "NVIDIA A100-SXM4-80GB", "A100-80GB"),
        ("modal", "NVIDIA A100-SXM4-40GB", "A100-40GB"),
        ("modal", "NVIDIA H100 80GB HBM3", "H100"),
        ("modal", "L40S", "L40S"),
    ],
)
def test_device_names_match_the_table(provider: str, device: str, gpu: str) -> None:
    assert match_device(price_table(provider), device) == gpu


def test_unknown_device_is_not_matched() -> None:
    assert match_device(price_table("runpod"), "cpu") is None
    assert match_device(price_table("modal"), "NVIDIA A1000") is None


def test_cost_is_seconds_times_the_rate_of_the_gpu_it_ran_on() -> None:
    rate = price_table("runpod").gpus["AMPERE_80"].usd_per_second
    cost = actual_cost("runpod", 120.0, 8.5, "NVIDIA A100 80GB PCIe", "AMPERE_16", "RunPod executionTime")
    assert (cost.gpu, cost.usd_per_second) == ("AMPERE_80", rate)
    assert cost.cost_usd == pytest.approx(120.0 * rate)
    assert cost.delay_seconds == 8.5
    assert cost.source.startswith("RunPod executionTime; runpod price table of ")


def test_a_device_the_table_lacks_is_priced_as_requested_and_says_so() -> None:
    cost = actual_cost("modal", 10.0, 0.0, "cpu", "L4", "Modal function run")
    assert cost.gpu == "L4"
    assert cost.cost_usd == pytest.approx(10.0 * price_table("modal").gpus["L4"].usd_per_second)
    assert "'cpu' is not in it, priced as the requested L4" in cost.source


def test_local_host_time_costs_nothing() -> None:
    cost = actual_cost("local", 3.2, 0.0, "cpu", "", "compute-local host time")
    assert (cost.gpu, cost.gpu_seconds, cost.cost_usd) == ("host", 3.2, 0.0)
