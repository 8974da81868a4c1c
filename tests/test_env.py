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


# --- the GPUs the course meets, and the one hardware check --------------------------------------


def test_gpus_are_looked_up_by_the_name_a_device_reports():
    assert env.gpu_spec("NVIDIA H100 PCIe").name == "H100 PCIe"  # before "H100", which its name contains
    assert env.gpu_spec("NVIDIA H100 80GB HBM3").bf16_tflops == 989.4
    assert env.gpu_spec("NVIDIA L40S").name == "L40S" and env.gpu_spec("NVIDIA L4").name == "L4"
    assert env.peak_tflops("NVIDIA H200", "fp8") == 1978.9 and env.peak_tflops("Tesla T4", "bf16") is None
    assert env.peak_tflops("Tesla T4", "fp16") == 65.0 and env.peak_tflops("a GPU we do not know") is None
    for gpu in env.GPUS.values():
        described = env.describe_gpu(gpu.name, gpu.compute_capability)
        assert described.fp8 == (gpu.fp8_tflops is not None) and described.bf16 == (gpu.bf16_tflops is not None)


def test_a_free_colab_runtime_in_gib():
    assert env.COLAB_HOST_RAM_GIB == pytest.approx(12.7e9 / 2**30, abs=0.05)  # 12.7 GB is 11.8 GiB
    assert env.COLAB_T4_GPU_GIB == env.GPUS["T4"].memory_gib and env.T4_USABLE_GIB < env.COLAB_T4_GPU_GIB


NEEDS_CUDA = env.Needs("a thing", why="it is a CUDA kernel", instead="the other thing", cuda=True)
NEEDS_ADA = env.Needs("fp8", why="fp8 tensor cores", instead="int8", min_cc=(8, 9))
NEEDS_TURING_TO_ADA = env.Needs("old kernels", why="built for Turing to Ada", instead="SDNQ", min_cc=(7, 5),
                                below_cc=(9, 0))


def test_the_hardware_check_says_what_is_missing_and_what_to_use():
    with pytest.raises(env.UnsupportedHardwareError, match=r"'x' needs a CUDA GPU \(it is a CUDA kernel\), and "
                                                             r"this device is CPU.*Instead: the other thing\."):
        env.check_hardware("x", [NEEDS_CUDA], DeviceInfo("cpu", "CPU (test)"))
    with pytest.raises(env.UnsupportedHardwareError, match=r"needs a CUDA GPU \(fp8 tensor cores\)"):
        env.check_hardware("x", [NEEDS_ADA], DeviceInfo("cpu", "CPU (test)"))  # a compute capability means a GPU
    with pytest.raises(env.UnsupportedHardwareError, match=r"needs compute capability 8\.9\+ \(fp8 tensor cores\); "
                                                             r"Tesla T4 \(cc 7\.5\) has 7\.5\. Instead: int8\."):
        env.check_hardware("x", [NEEDS_ADA], T4)
    env.check_hardware("x", [NEEDS_ADA, NEEDS_CUDA], H100)
    env.check_hardware("x", [NEEDS_TURING_TO_ADA], T4)
    with pytest.raises(env.UnsupportedHardwareError, match=r"compute capability below 9\.0 \(built for Turing to "
                                                             r"Ada\), and this device is NVIDIA H100"):
        env.check_hardware("x", [NEEDS_TURING_TO_ADA], H100)
    with pytest.raises(env.UnsupportedHardwareError, match="bf16 needs compute capability 8.0"):
        env.check_hardware("x", [], T4, torch.bfloat16)
    env.check_hardware("x", [], T4, torch.float16)


def test_a_missing_or_broken_package_is_named_with_its_pip_line(monkeypatch):
    need = env.Needs("FlashAttention-3", why="w", instead="attn-cudnn", modules=(("no_such_module_xyz", "xyz==1.0"),))
    with pytest.raises(env.UnsupportedHardwareError, match=r"needs FlashAttention-3, which is not installed here\. "
                                                             r"Install it with `pip install xyz==1\.0`"):
        env.check_hardware("x", [need], H100)
    env.check_hardware("x", [need], H100, packages=False)  # the hardware alone, for a GPU described
    monkeypatch.setattr(env.importlib.util, "find_spec", lambda name, *args: object())

    def no_cuda_13(name, *args):
        raise OSError("libcudart.so.13: cannot open shared object file")

    monkeypatch.setattr(env.importlib, "import_module", no_cuda_13)
    assert env._module_problem("fa3_fwd_interface").startswith("installed here but does not load (OSError: libcudart")
    broken = env.Needs("a version diffusers can drive", why="w", instead="pin 0.43.0",
                       software=lambda: "nvidia-modelopt 0.47.0 is installed, and diffusers 0.42.1 drives up to 0.43")
    with pytest.raises(env.UnsupportedHardwareError, match="needs a version diffusers can drive: nvidia-modelopt 0.47.0"):
        env.check_hardware("x", [broken], DeviceInfo("cpu", "CPU (test)"))


def test_unsupported_hardware_error_is_a_runtime_error():
    assert issubclass(env.UnsupportedHardwareError, RuntimeError)


def test_known_import_notices_are_dropped_and_nothing_else(caplog):
    import logging

    env.quiet_import_notices()
    env.quiet_import_notices()  # twice is once
    logger = logging.getLogger("torchao")
    assert sum(isinstance(f, env._KnownNotices) for f in logger.filters) == 1
    with caplog.at_level(logging.WARNING):
        logger.warning("Failed to load /x/site-packages/torchao/_C_mxfp8.so: Could not load this library")
        logger.warning("Failed to quantize layer 3")  # another warning still shows
        logger.error("Failed to load /x/site-packages/torchao/_C_mxfp8.so")  # an error is never hidden
    assert [r.getMessage() for r in caplog.records] == ["Failed to quantize layer 3",
                                                        "Failed to load /x/site-packages/torchao/_C_mxfp8.so"]
    assert len(env.KNOWN_IMPORT_NOTICES) == 9 and all(why for _, _, why in env.KNOWN_IMPORT_NOTICES)


def test_the_known_python_warning_is_dropped_and_others_still_show():
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        env.quiet_import_notices()
        warnings.warn("transformers version 5.23.0 is incompatible with nvidia-modelopt and may cause issues.")
        warnings.warn("transformers version 5.23.0 is incompatible with something else")
    assert [str(w.message) for w in caught] == ["transformers version 5.23.0 is incompatible with something else"]


def test_a_modelopt_that_does_not_import_is_a_reason_not_a_crash(monkeypatch):
    import builtins
    import sys

    real_import = builtins.__import__

    def no_pydantic(name, *args, **kwargs):
        if name.startswith("modelopt"):
            raise ModuleNotFoundError("No module named 'pydantic'")
        return real_import(name, *args, **kwargs)

    for name in [m for m in sys.modules if m.startswith("modelopt")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(builtins, "__import__", no_pydantic)
    assert env.modelopt_problem() == ("nvidia-modelopt is installed here but does not import "
                                      "(ModuleNotFoundError: No module named 'pydantic')")
