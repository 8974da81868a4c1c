"""Fitting a big model into a small GPU (chapter 05): what layerwise casting casts, where offloading
and `device_map` put each component, and which measured recipe has the smallest footprint.

The chapter calls diffusers itself, each in a cell of its own: `enable_layerwise_casting` (its whole
recipe) and `apply_layerwise_casting`, `enable_model_cpu_offload`, `enable_sequential_cpu_offload`,
`enable_group_offload` (block and leaf level, with and without a stream) and `device_map="balanced"`.
These helpers explain and compare what those calls did.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from .measure import require_columns

__all__ = [
    "layerwise_skip_patterns",
    "layerwise_casting_plan",
    "component_placement",
    "lowest_peak",
    "fastest_within",
]


def layerwise_skip_patterns(model: torch.nn.Module, skip_modules_pattern: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """The regular expressions `model.enable_layerwise_casting(skip_modules_pattern=...)` skips, as diffusers composes them.

    The given patterns (diffusers' defaults when None), plus, always, the model's `_keep_in_fp32_modules`
    and `_skip_layerwise_casting_patterns`: `enable_layerwise_casting` cannot cast what those name.
    `diffusers.hooks.apply_layerwise_casting` uses exactly the patterns it is given. Chapters 05, 07.
    """
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    patterns = tuple(DEFAULT_SKIP_MODULES_PATTERN if skip_modules_pattern is None else skip_modules_pattern)
    for extra in (getattr(model, "_keep_in_fp32_modules", None), getattr(model, "_skip_layerwise_casting_patterns", None)):
        if extra:
            patterns += tuple(extra)
    return tuple(sorted(set(patterns)))


def layerwise_casting_plan(model: torch.nn.Module, skip_patterns: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """One row per layer that layerwise casting considers: its name, class, parameter count, and
    whether it is cast to the storage dtype or skipped (and by which pattern).

    `skip_patterns=None` plans `model.enable_layerwise_casting()` with its defaults; given patterns
    are used exactly, as `diffusers.hooks.apply_layerwise_casting(..., skip_modules_pattern=...)` does.

    It walks the model as diffusers' `apply_layerwise_casting` does: a module whose dotted name
    matches a skip pattern (`re.search`) is skipped with everything inside it; otherwise a Linear,
    Conv or Embedding is cast, and any other module is searched further. Works on the meta device. Chapters 05, 07.
    """
    from diffusers.hooks._common import _GO_LC_SUPPORTED_PYTORCH_LAYERS

    patterns = layerwise_skip_patterns(model) if skip_patterns is None else tuple(skip_patterns)
    rows: list[dict[str, Any]] = []

    def walk(module: torch.nn.Module, name: str) -> None:
        matched = next((p for p in patterns if re.search(p, name)), None) if name else None
        if matched is not None:
            rows.append({"layer": name, "class": type(module).__name__, "params": _param_count(module),
                         "cast": False, "skipped_by": matched})
            return
        if isinstance(module, _GO_LC_SUPPORTED_PYTORCH_LAYERS):
            rows.append({"layer": name, "class": type(module).__name__, "params": _param_count(module),
                         "cast": True, "skipped_by": None})
            return
        direct = sum(p.numel() for p in module.parameters(recurse=False))
        if direct:  # parameters of a module that is neither skipped nor a supported layer stay as they are
            rows.append({"layer": name or "(root)", "class": type(module).__name__, "params": direct,
                         "cast": False, "skipped_by": "(not a Linear, Conv or Embedding)"})
        for child_name, child in module.named_children():
            walk(child, f"{name}.{child_name}" if name else child_name)

    walk(model, "")
    return rows


def _param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _component_device(component: torch.nn.Module) -> str:
    devices = sorted({str(p.device) for p in component.parameters()})
    return ", ".join(devices) if devices else "(no parameters)"


def component_placement(pipe) -> dict[str, dict[str, Any]]:
    """For each component of `pipe`: where its weights are now, and what moves them.

    `weights_on` is the device(s) holding the parameters at this moment; `hooks` names the
    accelerate hook (model or sequential offload, device_map) and the diffusers hooks (group offload,
    layerwise casting) attached to the component or any of its submodules. Chapter 05.
    """
    placement = {}
    for name, component in pipe.components.items():
        if not isinstance(component, torch.nn.Module):
            continue
        hooks: set[str] = set()
        for module in component.modules():
            accelerate_hook = getattr(module, "_hf_hook", None)
            if accelerate_hook is not None:
                inner = getattr(accelerate_hook, "hooks", [accelerate_hook])  # SequentialHook holds several
                hooks.update(type(h).__name__ for h in inner)
            registry = getattr(module, "_diffusers_hook", None)
            if registry is not None:
                hooks.update(registry.hooks.keys())
        device_map = getattr(pipe, "hf_device_map", None) or {}
        placement[name] = {
            "weights_on": _component_device(component),
            "device_map": str(device_map[name]) if name in device_map else None,
            "hooks": ", ".join(sorted(hooks)) or None,
        }
    return placement


def lowest_peak(frame, peak: str = "peak_gpu_mem_gib", time: str = "s_per_image"):
    """The row of `frame` with the smallest peak GPU memory (ties: the faster one). Chapter 05."""
    require_columns(frame, peak, time)
    ran = frame[frame[peak].notna()]
    if ran.empty:
        raise ValueError(f"No row of the frame has a {peak}: nothing was measured on a GPU.")
    return ran.sort_values([peak, time]).iloc[0]


def fastest_within(frame, peak_gib: float, peak: str = "peak_gpu_mem_gib", time: str = "s_per_image"):
    """The fastest row of `frame` whose peak GPU memory is at most `peak_gib`, or None if none fits.

    The peak is compared with `peak_gib` as it is: nothing is subtracted for the CUDA context or a display,
    which take a few hundred MiB of a real card. Pass a smaller `peak_gib` to leave that margin. Chapter 05.
    """
    require_columns(frame, peak, time)
    fits = frame[frame[peak].notna() & (frame[peak] <= peak_gib)]
    return None if fits.empty else fits.sort_values([time, peak]).iloc[0]

