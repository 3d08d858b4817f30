"""The device facts fwray computes MFU and plans with: the peak-FLOPs table matched by whole model name."""
import pytest

from fwray import hardware


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


def test_allocator_configuration_is_set_unless_the_user_chose_one(monkeypatch):
    monkeypatch.delenv(hardware.ALLOC_CONF_ENV, raising=False)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    hardware.configure_allocator()
    assert hardware.os.environ[hardware.ALLOC_CONF_ENV] == "expandable_segments:True"
    monkeypatch.setenv(hardware.ALLOC_CONF_ENV, "max_split_size_mb:128")
    hardware.configure_allocator()
    assert hardware.os.environ[hardware.ALLOC_CONF_ENV] == "max_split_size_mb:128"


def test_use_gpu_true_without_a_gpu_is_one_clear_error():
    with pytest.raises(hardware.DeviceError, match="resources.use_gpu: auto"):
        hardware.pick_device(True)
    assert hardware.pick_device("auto").type == "cpu" and hardware.pick_device(False).type == "cpu"
