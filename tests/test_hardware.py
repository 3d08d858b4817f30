"""The device facts fwray computes MFU and plans with (the peak-FLOPs table matched by whole model name), the CUDA
allocator configuration every process gets, and the attention kernel torch picks."""
import os

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from fwray import ray_session
from fwray.config import ModelConfig
from fwray.core import hardware
from fwray.core.model import GPT


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


def test_sdpa_backend_is_torchs_own_choice_for_each_attention_call():
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16))
    idx = torch.randint(0, 50257, (1, 16))
    with hardware.RecordSdpaBackends() as seen:
        model.hidden(idx)
    assert seen.backends == ["flash_attention"] * 2  # one per layer: the CPU's fused kernel for fp32
    with hardware.RecordSdpaBackends() as seen, sdpa_kernel(SDPBackend.MATH):
        model.hidden(idx)
    assert seen.backends == ["math"] * 2
    q = torch.randn(1, 2, 16, 8)
    assert hardware.sdpa_backend(q, q, q, is_causal=True) == "flash_attention"
    assert hardware.sdpa_backend(q, q, q.double(), is_causal=True) == "math"  # mixed dtypes: no fused kernel


def test_consumer_card_attention_switches_cudnn_attention_off():
    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        hardware.attend_as_consumer_cards()
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for a GPU that is not there")
def test_the_device_picker_without_a_gpu():
    with pytest.raises(hardware.DeviceError, match="torch sees no CUDA GPU here; use --device auto or cpu"):
        hardware.pick_device("cuda")
    with pytest.raises(hardware.DeviceError, match="not a device torch knows"):
        hardware.pick_device("gpu0")
    assert hardware.pick_device("auto") == torch.device("cpu") and hardware.pick_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_the_device_picker_indexes_the_gpu():
    """torch.cuda.set_per_process_memory_fraction rejects a bare "cuda": the picker never returns one."""
    assert hardware.pick_device("cuda").index is not None and hardware.pick_device("auto").index is not None
