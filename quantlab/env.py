"""What this machine is: package versions, the device, what it supports, and free memory."""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass, field
from importlib import metadata

import torch

__all__ = [
    "DeviceInfo",
    "EnvReport",
    "PACKAGES",
    "default_device",
    "default_dtype",
    "describe_gpu",
    "device_info",
    "host_memory_gib",
    "package_versions",
    "report",
]

GIB = 1024**3

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
)

# Compute capabilities: bf16 arrived with Ampere (8.0), fp8 tensor cores with Ada and Hopper (8.9).
BF16_MIN_CC = (8, 0)
FP8_MIN_CC = (8, 9)


@dataclass(frozen=True)
class DeviceInfo:
    """One device and the number formats it can compute in."""

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
    """Versions, device and memory, in one object that prints as a table."""

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
    """Installed version of each package, or 'not installed'."""
    versions = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def default_device() -> str:
    """`$QUANTLAB_DEVICE` if set, else 'cuda' when a GPU is visible, else 'cpu'."""
    return os.environ.get("QUANTLAB_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


def describe_gpu(name: str, compute_capability: tuple[int, int], total_memory_gib: float | None = None,
                 free_memory_gib: float | None = None) -> DeviceInfo:
    """A CUDA GPU, present or not: the number formats it computes in follow from its compute capability."""
    cc = tuple(compute_capability)
    return DeviceInfo(kind="cuda", name=name, compute_capability=cc, bf16=cc >= BF16_MIN_CC, fp8=cc >= FP8_MIN_CC,
                      total_memory_gib=total_memory_gib, free_memory_gib=free_memory_gib)


def device_info(device: str | None = None) -> DeviceInfo:
    """Describe `device` (default: `default_device()`)."""
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
    """bf16 where the device computes in it, else fp16 (a T4, for example)."""
    info = info or device_info()
    return torch.bfloat16 if info.bf16 else torch.float16


def host_memory_gib() -> tuple[float | None, float | None]:
    """(total, available) host RAM in GiB, read from /proc/meminfo; (None, None) where there is none."""
    try:
        with open("/proc/meminfo") as f:
            fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    except OSError:
        return None, None
    return fields["MemTotal"] / GIB, fields.get("MemAvailable", fields["MemFree"]) / GIB


def report(device: str | None = None) -> EnvReport:
    """One call: versions, device, compute capability, bf16 and fp8 support, and free memory."""
    total, available = host_memory_gib()
    return EnvReport(
        python=platform.python_version(),
        platform=platform.platform(),
        versions=package_versions(),
        device=device_info(device),
        host_total_gib=total,
        host_available_gib=available,
    )
