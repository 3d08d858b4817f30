"""The device facts fwray computes MFU and plans with (the peak-FLOPs table matched by whole model name), the CUDA
allocator configuration every process gets."""
import os

import pytest
import torch

from fwray import hardware, ray_session


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA GeForce RTX 4070", 58.3),
    ("NVIDIA GeForce RTX 4070 Ti", 80.2),
    ("NVIDIA GeForce RTX 4070 SUPER", 71.0),
    ("NVIDIA GeForce RTX 4090 D", 147.1),
    ("NVIDIA GeForce RTX 4090", 165.2),
    ("NVIDIA A40", 149.7),
    ("NVIDIA RTX A4000", 76.7),
    ("NVIDIA H100 80GB HBM3", 989.0),
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H200", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("RTX 4070", 58.3),  # hardware.gpu in an experiment file
    # not in the table: no MFU rather than a namesake's peak
    ("NVIDIA GeForce RTX 4070 Laptop GPU", None),
    ("NVIDIA RTX A3000 Laptop GPU", None),
    ("NVIDIA RTX A2000", None),
    ("Tesla T4", None),
])
def test_peak_table_matches_whole_names(name, peak):
    assert hardware.table_peak(name) == peak


def _allocator_env() -> list[str | None]:
    return [os.environ.get(name) for name in hardware.ALLOC_CONF_ENVS]


def test_allocator_configuration_goes_under_both_names_and_keeps_the_users(monkeypatch):
    for name in hardware.ALLOC_CONF_ENVS:
        monkeypatch.delenv(name, raising=False)
    hardware.configure_allocator()
    assert _allocator_env() == ["expandable_segments:True"] * 2
    for users in hardware.ALLOC_CONF_ENVS:  # a user's value under either name: kept, and given to the other name
        for name in hardware.ALLOC_CONF_ENVS:
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv(users, "max_split_size_mb:128")
        hardware.configure_allocator()
        assert _allocator_env() == ["max_split_size_mb:128"] * 2
    monkeypatch.setenv(hardware.ALLOC_CONF_ENVS[0], "expandable_segments:False")  # both set: neither changes
    hardware.configure_allocator()
    assert _allocator_env() == ["expandable_segments:False", "max_split_size_mb:128"]


def test_ray_workers_are_given_both_allocator_variables(monkeypatch):
    for name in hardware.ALLOC_CONF_ENVS:
        monkeypatch.delenv(name, raising=False)
    env = ray_session.worker_env()
    assert [env.get(name) for name in hardware.ALLOC_CONF_ENVS] == ["expandable_segments:True"] * 2


def test_cpu_has_no_cuda_allocator_settings():
    assert hardware.allocator_settings(torch.device("cpu")) is None


def test_use_gpu_true_without_a_gpu_is_one_clear_error():
    with pytest.raises(hardware.DeviceError, match="resources.use_gpu: auto"):
        hardware.pick_device(True)
    assert hardware.pick_device("auto").type == "cpu" and hardware.pick_device(False).type == "cpu"
