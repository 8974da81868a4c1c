"""Quanto (optimum-quanto) around chapter 04: its weight types, what each Linear became, the one-time
kernel build, and diffusers' deprecation of `QuantoConfig`.

The chapter calls quanto itself (`QuantoConfig`, `quantize`, `freeze`, `quantization_map`,
`requantize`); these helpers only look at the result and time what quanto does on first use.
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = [
    "WEIGHT_TYPES",
    "DIFFUSERS_DEPRECATION",
    "KernelLoad",
    "qtype",
    "weight_tensor_types",
    "kernel_extensions",
    "load_kernels",
    "deprecation_messages",
]

# The names diffusers' `QuantoConfig(weights_dtype=...)` accepts, in the order of the chapter.
WEIGHT_TYPES = ("int8", "float8", "int4", "int2")

# Checked against the released wheels: 0.37.1 has no warning, 0.38.0 is the first to warn.
DIFFUSERS_DEPRECATION = {
    "deprecated_in": "0.38.0",
    "removed_in": "1.0.0",
    "instead": "BitsAndBytesConfig or TorchAoConfig (diffusers' own advice), or a GGUF file with "
               "GGUFQuantizationConfig; on a CPU, torchao's Int8WeightOnlyConfig. quanto's own API "
               "(quantize, freeze) is not deprecated: only diffusers' integration of it is.",
}


def qtype(weights: str):
    """The `optimum.quanto` qtype for a `weights_dtype` name ("int8", "float8", "int4", "int2"). The lab's Quanto
    check (quantlab.lab.bench.quantize_and_compare, results/04)."""
    from optimum.quanto import qfloat8, qint2, qint4, qint8

    types = {"int8": qint8, "float8": qfloat8, "int4": qint4, "int2": qint2}
    if weights not in types:
        raise ValueError(f"Unknown quanto weight type {weights!r}. Valid: {', '.join(types)}.")
    return types[weights]


def weight_tensor_types(module: torch.nn.Module) -> dict[str, int]:
    """How many Linear weights of `module` are of each tensor class, e.g. {"WeightQBytesTensor qint8": 62}.

    The class tells which kernel runs: quanto picks Marlin, AWQ or TinyGemm packings on a GPU, and
    plain `WeightQBytesTensor`/`WeightQBitsTensor` elsewhere. Unquantized Linears count as "Tensor <dtype>". Chapter 04.
    """
    counts: dict[str, int] = {}
    for layer in module.modules():
        if not isinstance(layer, torch.nn.Linear):
            continue
        weight = layer.weight
        qtype_of = getattr(weight, "qtype", None)
        key = f"{type(weight).__name__} {qtype_of.name}" if qtype_of is not None else f"Tensor {weight.dtype}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: -item[1]))


@dataclass
class KernelLoad:
    """What `load_kernels` found: how long the first use of a quanto extension took, and whether it compiled.
    Chapter 04."""

    extension: str
    seconds: float
    built: bool  # True: compiled now; False: loaded a build from an earlier run (or already loaded here)
    already_loaded: bool
    build_directory: str
    note: str = ""


def _extension(name: str):
    from optimum.quanto.library.extensions import get_extension, is_extension_available

    if not is_extension_available(name):
        raise ValueError(f"quanto has no {name!r} kernels on this machine. It has: {', '.join(kernel_extensions())}. "
                         "quanto_cuda exists only where CUDA is available.")
    return get_extension(name)


def kernel_extensions() -> list[str]:
    """The quanto kernel extensions registered on this machine: quanto_cpp always, quanto_cuda with a GPU.
    Chapter 04."""
    from optimum.quanto.library.extensions.extension import _extensions

    return sorted(_extensions)


def load_kernels(extension: str = "quanto_cpp", rebuild: bool = False) -> KernelLoad:
    """Time the first use of a quanto kernel extension in this process.

    quanto compiles its C++/CUDA kernels with `torch.utils.cpp_extension.load` the first time an
    operation needs them, into a `build/` folder beside its sources, and loads that build afterwards.
    `rebuild=True` deletes the folder first, as quanto itself does after a torch upgrade, so the
    time is a cold compile. Chapter 04.
    """
    ext = _extension(extension)
    if ext._lib is not None:
        return KernelLoad(extension, 0.0, False, True, ext.build_directory, "already loaded in this process")
    build = Path(ext.build_directory)
    note = ""
    if rebuild and build.exists():
        if os.access(build.parent, os.W_OK):
            shutil.rmtree(build)
        else:
            note = f"could not rebuild: {build.parent} is read-only, so the existing build was loaded"
    built = not (build / f"{extension}.so").exists()
    start = time.perf_counter()
    ext.lib  # noqa: B018 - the property compiles (or loads) the extension
    return KernelLoad(extension, time.perf_counter() - start, built, False, str(build), note)


def deprecation_messages(fn: Callable[[], Any]) -> tuple[Any, list[str]]:
    """Call `fn` and return its result with the deprecation warnings it raised (each message once). Chapter 04."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    messages = []
    for warning in caught:
        if issubclass(warning.category, (FutureWarning, DeprecationWarning)) and "deprecat" in str(warning.message):
            text = str(warning.message)
            if text not in messages:
                messages.append(text)
    return result, messages
