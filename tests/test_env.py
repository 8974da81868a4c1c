"""Tests for quantlab.env: package versions, device description, default device and dtype, the report."""

from __future__ import annotations

import os
from importlib import metadata

import pytest
import torch

from quantlab import env
from quantlab.env import DeviceInfo

T4 = DeviceInfo(kind="cuda", name="Tesla T4", compute_capability=(7, 5), bf16=False, fp8=False)
H100 = DeviceInfo(kind="cuda", name="NVIDIA H100 80GB HBM3", compute_capability=(9, 0), bf16=True, fp8=True)

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a CUDA GPU")


def test_package_versions_match_importlib_metadata():
    versions = env.package_versions()
    assert list(versions) == list(env.PACKAGES)
    for name, version in versions.items():
        try:
            expected = metadata.version(name)
        except metadata.PackageNotFoundError:
            expected = "not installed"
        assert version == expected, name
    assert versions["torch"] == metadata.version("torch")
    assert versions["torch"] != "not installed"


def test_package_versions_missing_package():
    versions = env.package_versions(("torch", "surely-not-a-real-package-xyz"))
    assert versions == {"torch": metadata.version("torch"), "surely-not-a-real-package-xyz": "not installed"}


def test_device_info_cpu():
    info = env.device_info("cpu")
    assert info.kind == "cpu"
    assert info.bf16 is True
    assert info.fp8 is False
    assert info.compute_capability is None
    assert info.total_memory_gib is not None and info.total_memory_gib > 0
    assert info.free_memory_gib is not None and 0 < info.free_memory_gib <= info.total_memory_gib
    assert info.name.startswith("CPU (") and f"{os.cpu_count()} cores" in info.name
    assert info.label == info.name  # no compute capability to add


@no_cuda
def test_device_info_cuda_without_gpu_raises():
    with pytest.raises(RuntimeError, match="device='cpu'") as error:
        env.device_info("cuda")
    assert "'cuda'" in str(error.value)
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        env.device_info("cuda:1")


def test_device_info_unknown_device_raises():
    with pytest.raises(ValueError, match="Unknown device 'tpu'") as error:
        env.device_info("tpu")
    assert "'cpu', 'cuda', 'cuda:N'" in str(error.value)


def test_device_label():
    assert T4.label == "Tesla T4 (cc 7.5)"
    assert H100.label == "NVIDIA H100 80GB HBM3 (cc 9.0)"
    assert DeviceInfo(kind="cpu", name="CPU (x86_64, 2 cores)").label == "CPU (x86_64, 2 cores)"


def test_default_device_honours_env(monkeypatch):
    monkeypatch.setenv("QUANTLAB_DEVICE", "cuda:1")
    assert env.default_device() == "cuda:1"
    monkeypatch.setenv("QUANTLAB_DEVICE", "cpu")
    assert env.default_device() == "cpu"
    monkeypatch.delenv("QUANTLAB_DEVICE")
    assert env.default_device() == ("cuda" if torch.cuda.is_available() else "cpu")


def test_device_info_defaults_to_default_device(monkeypatch):
    monkeypatch.setenv("QUANTLAB_DEVICE", "cpu")
    assert env.device_info().kind == "cpu"
    monkeypatch.setenv("QUANTLAB_DEVICE", "tpu")
    with pytest.raises(ValueError, match="'tpu'"):
        env.device_info()


def test_default_dtype():
    assert env.default_dtype(H100) == torch.bfloat16
    assert env.default_dtype(DeviceInfo(kind="cpu", name="CPU")) == torch.bfloat16
    assert env.default_dtype(T4) == torch.float16


def test_default_dtype_from_env_device(monkeypatch):
    monkeypatch.setenv("QUANTLAB_DEVICE", "cpu")
    assert env.default_dtype() == torch.bfloat16


def test_host_memory():
    total, available = env.host_memory_gib()
    assert total is not None and total > 0
    assert available is not None and 0 < available <= total


def test_report_text_and_markdown():
    report = env.report("cpu")
    text = str(report)
    for name in env.PACKAGES:
        assert name in text, name
    assert "bf16" in text
    assert "fp8 (cc >= 8.9)" in text
    assert report.device.label in text
    lines = text.splitlines()
    assert len(lines) == 2 + len(env.PACKAGES) + 5 == len(report.rows())
    assert dict(report.rows())["bf16"] == "yes"
    assert dict(report.rows())["fp8 (cc >= 8.9)"] == "no"
    assert dict(report.rows())["torch"] == metadata.version("torch")
    assert repr(report) == text
    markdown = report._repr_markdown_()
    assert markdown.startswith("| | |\n|---|---|\n")
    assert "| bf16 | yes |" in markdown
    assert markdown.count("\n") == 2 + len(report.rows()) - 1


def test_report_rows_for_a_t4():
    report = env.EnvReport(python="3.11.0", platform="Linux", versions={"torch": "2.9.0"}, device=T4,
                           host_total_gib=None, host_available_gib=12.34)
    rows = dict(report.rows())
    assert rows["device"] == "Tesla T4 (cc 7.5)"
    assert rows["bf16"] == "no"
    assert rows["fp8 (cc >= 8.9)"] == "no"
    assert rows["device memory free / total"] == "n/a / n/a"
    assert rows["host RAM available / total"] == "12.3 GiB / n/a"
    assert report.as_dict()["device"]["compute_capability"] == (7, 5)


def test_a_described_gpu_computes_in_what_its_compute_capability_allows():
    assert env.describe_gpu("Tesla T4", (7, 5)) == T4
    assert env.describe_gpu("NVIDIA H100 80GB HBM3", (9, 0)) == H100
    ada = env.describe_gpu("NVIDIA L4", [8, 9], total_memory_gib=22.0)
    assert (ada.compute_capability, ada.bf16, ada.fp8, ada.total_memory_gib) == ((8, 9), True, True, 22.0)
    ampere = env.describe_gpu("NVIDIA A100", (8, 0))
    assert ampere.bf16 and not ampere.fp8
