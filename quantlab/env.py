"""The machine: package versions, the device and the number formats it computes in, the GPUs the course
meets, and the one hardware check every recipe goes through (chapter 00 and every chapter after it)."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import io
import os
import platform
import re
import warnings
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Iterable

import torch

__all__ = [
    "GIB",
    "DeviceInfo",
    "EnvReport",
    "GPU",
    "GPUS",
    "Needs",
    "PACKAGES",
    "UnsupportedHardwareError",
    "COLAB_T4_GPU_GIB",
    "COLAB_HOST_RAM_GIB",
    "T4_USABLE_GIB",
    "check_hardware",
    "default_device",
    "default_dtype",
    "describe_gpu",
    "device_info",
    "gpu_spec",
    "host_memory_gib",
    "package_versions",
    "peak_tflops",
    "report",
    "KNOWN_IMPORT_NOTICES",
    "quiet_import_notices",
    "MODELOPT_PIN",
    "modelopt_problem",
]

GIB = 1024**3  # the course writes GiB wherever it means 1024**3 bytes, as torch's memory counters do

# The packages whose versions every measurement records.
PACKAGES = (
    "torch",
    "diffusers",
    "transformers",
    "accelerate",
    "bitsandbytes",
    "torchao",
    "optimum-quanto",
    "gguf",
    "sdnq",
    "nvidia-modelopt",
    "auto-round",
)

# Compute capabilities: bf16 arrived with Ampere (8.0), fp8 tensor cores with Ada and Hopper (8.9).
BF16_MIN_CC = (8, 0)
FP8_MIN_CC = (8, 9)


class UnsupportedHardwareError(RuntimeError):
    """Something needs what this device lacks (a CUDA GPU, bf16, fp8, a package, ...); raised before anything loads.
    Every chapter."""


@dataclass(frozen=True)
class GPU:
    """A GPU the course meets: memory, compute capability, dense tensor-core peaks (TFLOP/s) and memory bandwidth.
    Every chapter."""

    name: str
    memory_gib: float
    compute_capability: tuple[int, int]
    bf16_tflops: float | None  # None: no bf16 tensor cores
    fp8_tflops: float | None  # None: no fp8 tensor cores
    fp16_tflops: float
    bandwidth_gb_s: float


# NVIDIA datasheets, dense (without sparsity). Looked up by substring of the device name, in this order.
GPUS = {
    "H100 PCIe": GPU("H100 PCIe", 79.2, (9, 0), 756.0, 1513.0, 756.0, 2000.0),
    "H100": GPU("H100", 79.2, (9, 0), 989.4, 1978.9, 989.4, 3350.0),  # SXM: the H100 80GB HBM3 the GPU box lends
    "H200": GPU("H200", 139.8, (9, 0), 989.4, 1978.9, 989.4, 4800.0),
    "L40S": GPU("L40S", 44.4, (8, 9), 362.0, 733.0, 362.0, 864.0),  # before "L4", which its name contains
    "A100-40GB": GPU("A100-40GB", 39.4, (8, 0), 312.0, None, 312.0, 1555.0),
    "A100": GPU("A100", 79.2, (8, 0), 312.0, None, 312.0, 2039.0),
    "RTX 4090": GPU("RTX 4090", 24.0, (8, 9), 165.2, 330.3, 165.2, 1008.0),
    "L4": GPU("L4", 22.0, (8, 9), 121.0, 242.0, 121.0, 300.0),
    "T4": GPU("T4", 15.0, (7, 5), None, None, 65.0, 320.0),  # fp16 only
}

# A free Google Colab runtime: a T4 that Colab shows as 15 GiB (PyTorch sees 14.75, and the CUDA context takes
# about 0.5 of that), and 12.7 GB of host RAM, which is 11.8 GiB.
COLAB_T4_GPU_GIB = 15.0
T4_USABLE_GIB = 14.25
COLAB_HOST_RAM_GIB = 11.8


@dataclass(frozen=True)
class DeviceInfo:
    """One device and the number formats it can compute in. Every chapter."""

    kind: str  # "cuda" or "cpu"
    name: str
    compute_capability: tuple[int, int] | None = None
    bf16: bool = True
    fp8: bool = False
    total_memory_gib: float | None = None
    free_memory_gib: float | None = None

    @property
    def label(self) -> str:
        """A short human-readable name, for example 'NVIDIA H100 80GB HBM3 (cc 9.0)'."""
        if self.compute_capability:
            return f"{self.name} (cc {self.compute_capability[0]}.{self.compute_capability[1]})"
        return self.name


@dataclass
class EnvReport:
    """Versions, device and memory, in one object that prints as a table. Every chapter."""

    python: str
    platform: str
    versions: dict[str, str]
    device: DeviceInfo
    host_total_gib: float | None
    host_available_gib: float | None
    extra: dict[str, str] = field(default_factory=dict)

    def rows(self) -> list[tuple[str, str]]:
        """(what, value) pairs, in display order."""
        d = self.device
        gib = lambda x: "n/a" if x is None else f"{x:.1f} GiB"  # noqa: E731
        rows = [("python", self.python), ("platform", self.platform)]
        rows += [(name, version) for name, version in self.versions.items()]
        rows += [
            ("device", d.label),
            ("bf16", "yes" if d.bf16 else "no"),
            ("fp8 (cc >= 8.9)", "yes" if d.fp8 else "no"),
            ("device memory free / total", f"{gib(d.free_memory_gib)} / {gib(d.total_memory_gib)}"),
            ("host RAM available / total", f"{gib(self.host_available_gib)} / {gib(self.host_total_gib)}"),
        ]
        return rows

    def __str__(self) -> str:
        width = max(len(k) for k, _ in self.rows())
        return "\n".join(f"{k:<{width}}  {v}" for k, v in self.rows())

    __repr__ = __str__

    def _repr_markdown_(self) -> str:
        return "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in self.rows())

    def as_dict(self) -> dict:
        """Plain dict, for JSON."""
        return asdict(self)


def package_versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """Installed version of each package, or 'not installed' (chapter 00)."""
    versions = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def default_device() -> str:
    """`$QUANTLAB_DEVICE` if set, else 'cuda' when a GPU is visible, else 'cpu' (every chapter)."""
    return os.environ.get("QUANTLAB_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


def describe_gpu(name: str, compute_capability: tuple[int, int], total_memory_gib: float | None = None,
                 free_memory_gib: float | None = None) -> DeviceInfo:
    """A CUDA GPU, present or not: the number formats it computes in follow from its compute capability.
    Every chapter."""
    cc = tuple(compute_capability)
    return DeviceInfo(kind="cuda", name=name, compute_capability=cc, bf16=cc >= BF16_MIN_CC, fp8=cc >= FP8_MIN_CC,
                      total_memory_gib=total_memory_gib, free_memory_gib=free_memory_gib)


def device_info(device: str | None = None) -> DeviceInfo:
    """Describe `device` (default: `default_device()`) (every chapter)."""
    device = device or default_device()
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"{device!r} was asked for, but PyTorch sees no CUDA GPU here. Use device='cpu'.")
        index = torch.device(device).index or 0
        cc = torch.cuda.get_device_capability(index)
        free, total = torch.cuda.mem_get_info(index)
        return describe_gpu(torch.cuda.get_device_name(index), cc, total / GIB, free / GIB)
    if device == "cpu":
        total, available = host_memory_gib()
        return DeviceInfo(
            kind="cpu",
            name=f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
            bf16=True,  # PyTorch computes bf16 on any CPU, natively or emulated
            fp8=False,
            total_memory_gib=total,
            free_memory_gib=available,
        )
    raise ValueError(f"Unknown device {device!r}. Valid devices: 'cpu', 'cuda', 'cuda:N'.")


def default_dtype(info: DeviceInfo | None = None) -> torch.dtype:
    """bf16 where the device computes in it, else fp16 (a T4, for example) (every chapter)."""
    info = info or device_info()
    return torch.bfloat16 if info.bf16 else torch.float16


def host_memory_gib() -> tuple[float | None, float | None]:
    """(total, available) host RAM in GiB, read from /proc/meminfo; (None, None) where there is none. Every chapter."""
    try:
        with open("/proc/meminfo") as f:
            fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    except OSError:
        return None, None
    return fields["MemTotal"] / GIB, fields.get("MemAvailable", fields["MemFree"]) / GIB


def report(device: str | None = None) -> EnvReport:
    """One call: versions, device, compute capability, bf16 and fp8 support, and free memory (every chapter)."""
    total, available = host_memory_gib()
    return EnvReport(
        python=platform.python_version(),
        platform=platform.platform(),
        versions=package_versions(),
        device=device_info(device),
        host_total_gib=total,
        host_available_gib=available,
    )


def gpu_spec(device_name: str) -> GPU | None:
    """The entry of `GPUS` whose key the device name contains ("H100 PCIe" before "H100"), or None. Chapter 06."""
    return next((gpu for key, gpu in GPUS.items() if key in device_name), None)


def peak_tflops(device_name: str, dtype: str = "bf16") -> float | None:
    """Dense tensor-core peak of the GPU called `device_name` in `dtype` ("bf16", "fp8", "fp16"), or None (chapter 06)."""
    gpu = gpu_spec(device_name)
    return None if gpu is None else getattr(gpu, f"{dtype}_tflops")


# --- the one hardware check ---------------------------------------------------------------------


@dataclass(frozen=True)
class Needs:
    """What one part of a recipe needs from the device, why, and what to use where it is missing.

    `cuda`: a CUDA GPU; `min_cc`/`below_cc`: a compute capability range; `fp16_only_ok`: False where bf16 is
    required; `modules`: importable Python modules (a package beyond the course's pins, or Triton); `check`: a
    function that returns why the installed software cannot do it (a version diffusers cannot drive), or None.
    Every chapter.
    """

    what: str  # "bitsandbytes through diffusers", "float8 matmuls", ...
    why: str
    instead: str
    cuda: bool = False
    min_cc: tuple[int, int] | None = None
    below_cc: tuple[int, int] | None = None
    not_major: tuple[int, ...] = ()  # compute capability majors refused (Nunchaku Lite: 9, Hopper)
    modules: tuple[tuple[str, str], ...] = ()  # (module to import, pip requirement that provides it)
    software: object = None  # a callable () -> str | None: why the installed software cannot, or None


def _module_problem(module: str) -> str | None:
    """Why `module` cannot be used here ('not installed here', or why it does not import), or None."""
    if importlib.util.find_spec(module) is None:
        return "not installed here"
    try:  # installed is not the same as usable: FA3, for one, loads a CUDA 13 runtime
        importlib.import_module(module)
    except (ImportError, OSError, RuntimeError) as error:
        return f"installed here but does not load ({type(error).__name__}: {str(error)[:200]})"
    return None


def check_hardware(name: str, needs: Iterable[Needs], device: DeviceInfo | None = None,
                   dtype: torch.dtype | None = None, packages: bool = True) -> None:
    """Raise `UnsupportedHardwareError` if what `name` needs is missing on `device` in `dtype`. Loads nothing.

    With `packages` (the default) the modules and software versions a need names must be usable here too;
    `packages=False` asks about the hardware alone, for a GPU described, not present (chapter 07's advice). Every
    chapter.
    """
    device = device or device_info()
    cc = device.compute_capability
    for need in needs:
        if (need.cuda or need.min_cc or need.below_cc or need.not_major) and device.kind != "cuda":
            raise UnsupportedHardwareError(
                f"{name!r} needs a CUDA GPU ({need.why}), and this device is {device.label}. Instead: {need.instead}.")
        if need.min_cc and cc is not None and cc < need.min_cc:
            raise UnsupportedHardwareError(
                f"{name!r} needs compute capability {need.min_cc[0]}.{need.min_cc[1]}+ ({need.why}); {device.label} has "
                f"{cc[0]}.{cc[1]}. Instead: {need.instead}.")
        if cc is not None and cc[0] in need.not_major:
            raise UnsupportedHardwareError(
                f"{name!r} does not run on compute capability {cc[0]}.x ({need.why}), and {device.label} is one. "
                f"Instead: {need.instead}.")
        if need.below_cc and cc is not None and cc >= need.below_cc:
            raise UnsupportedHardwareError(
                f"{name!r} needs a GPU of compute capability below {need.below_cc[0]}.{need.below_cc[1]} ({need.why}), "
                f"and this device is {device.label}. Instead: {need.instead}.")
        if not packages:
            continue
        for module, requirement in need.modules:
            problem = _module_problem(module)
            if problem:
                raise UnsupportedHardwareError(
                    f"{name!r} needs {need.what}, which is {problem}. Install it with `pip install {requirement}`, or "
                    f"instead: {need.instead}.")
        problem = need.software() if callable(need.software) else None
        if problem:
            raise UnsupportedHardwareError(f"{name!r} needs {need.what}: {problem}. Instead: {need.instead}.")
    if dtype == torch.bfloat16 and not device.bf16:
        raise UnsupportedHardwareError(
            f"bf16 needs compute capability 8.0+ (Ampere or newer), and {device.label} lacks it. "
            "Load in float16 instead (dtype=torch.float16), which is the default on this GPU.")


MODELOPT_PIN = "nvidia-modelopt==0.37.0"  # the newest that diffusers 0.42.1 drives (chapter 08)


def modelopt_problem() -> str | None:
    """Why the installed nvidia-modelopt cannot quantize through diffusers' NVIDIAModelOptConfig, or None.

    Runs diffusers' own steps on one 16×16 layer (under a second): 0.44.0 and newer fail in the config
    (`'list' object is not a mapping`); 0.39.0 to 0.43.0 leave the weights unquantized, and the first forward fails.
    Chapters 07 and 08 (the ModelOpt recipes' check).
    """
    if importlib.util.find_spec("modelopt") is None:
        return f"nvidia-modelopt is not installed here (pip install {MODELOPT_PIN})"
    import copy

    try:  # installed is not importable: a missing dependency of modelopt's (pydantic, on one GPU machine)
        import modelopt
        import modelopt.torch.opt as mto
        import modelopt.torch.quantization as mtq
        from diffusers import NVIDIAModelOptConfig
    except (ImportError, RuntimeError) as error:  # diffusers wraps a failed import in a RuntimeError
        return f"nvidia-modelopt is installed here but does not import ({type(error).__name__}: {error})"

    where = f"nvidia-modelopt {modelopt.__version__} is installed, and diffusers 0.42.1 drives {MODELOPT_PIN}"
    try:  # quietly: modelopt prints how many quantizers it inserted, and warns that compressing is experimental
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = NVIDIAModelOptConfig(quant_type="FP8").modelopt_config
            layer = torch.nn.Sequential(torch.nn.Linear(16, 16, dtype=torch.bfloat16))
            mto.apply_mode(layer, mode=[("quantize", copy.deepcopy(config))])  # what diffusers does before loading,
            mtq.calibrate(layer[0], config["algorithm"], None)  # and to each Linear as it loads
            mtq.compress(layer[0])
    except (TypeError, ValueError, AssertionError) as error:
        return f"{where}: its config fails ({type(error).__name__}: {error})"
    if layer[0]._parameters["weight"].dtype != torch.float8_e4m3fn:
        return f"{where}: the weights stay unquantized, and the first forward would fail"
    return None



# --- notices the libraries print when imported --------------------------------------------------------------

# What the libraries this course imports log about optional parts a machine lacks (most once per process, when
# diffusers is first imported): (logger, message pattern, why it says nothing about the chapter's work). Chapter 00
# shows them.
# The logger "warnings" stands for a Python warning (warnings.warn) rather than a log record.
KNOWN_IMPORT_NOTICES = (
    ("sdnq", r"^SDNQ: OpenVINO MM kernels are not available", "an optional Intel CPU kernel; sdnq uses PyTorch's own"),
    ("warnings", r"inner dimension \(16\) is not aligned for fast kernel",
     "on a GPU, the mini model's 16-wide input layer is narrower than bitsandbytes' fast 4-bit kernel's blocks of 64 "
     "(FLUX.1-dev's is 64 wide); bitsandbytes computes it with its general kernel"),
    ("warnings", r"transformers version .* is incompatible with nvidia-modelopt",
     "modelopt's check for its own Hugging Face export tools; diffusers' NVIDIAModelOptConfig path works with ours"),
    ("torchao", r"^Failed to load .*torchao/_C_\w+", "torchao's CUDA-only kernels, on a machine without that CUDA"),
    ("torchao.kernel.intmm", r"Detected no triton", "Triton, which only a CUDA build of torch brings"),
    ("torch.utils._pytree", r"is an Enum subclass and is now natively supported", "a deprecation inside torchao"),
    ("transformers.utils.import_utils", r"requires torchvision \(not installed\)",
     "image processors for models FLUX does not use"),
    ("bitsandbytes.backends.cpu.ops", r"^Failed to load CPU gemm_4bit_forward from kernels-community",
     "an optional CPU kernel from the Hub; bitsandbytes uses its own"),
    ("diffusers.quantizers.torchao.torchao_quantizer", r"^Unable to import `torchao` Tensor objects",
     "follows from torchao's CUDA-only kernels above; the course saves torchao models with safetensors"),
)


class _KnownNotices(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.WARNING or not self.pattern.search(record.getMessage())


def quiet_import_notices() -> None:
    """Drop the `KNOWN_IMPORT_NOTICES` (and nothing else: an error or another warning still shows). quantlab calls
    it when it is imported, so a chapter that imports quantlab before diffusers starts quietly. Every chapter."""
    for name, pattern, _why in KNOWN_IMPORT_NOTICES:
        if name == "warnings":
            warnings.filterwarnings("ignore", message=pattern)
            continue
        logger = logging.getLogger(name)
        if not any(isinstance(f, _KnownNotices) and f.pattern.pattern == pattern for f in logger.filters):
            logger.addFilter(_KnownNotices(pattern))
