"""The one loop of every lab tool: measure each scenario in turn, keep going past failures, save as it goes.

A `Scenario` is a name (the row's key in the results file) and a function that measures one row. `run_scenarios`
resets the GPU's memory counters, dynamo, the attention backend and inductor's settings before each one, records a
failure as a row that says why (the next scenario still runs), frees memory after each, and rewrites the results
file after every row (atomically: a killed run keeps the rows it finished), replacing an older row of the same name.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from .. import env, measure, models

__all__ = ["Scenario", "run_scenarios", "failure_row", "describe", "common_arguments", "random_transformer_inputs"]


@dataclass(frozen=True)
class Scenario:
    """One row to measure: its name in the results file, and the function that measures it."""

    name: str
    measure: Callable[[], measure.Measurement]


def failure_row(model: str, name: str, device: str | env.DeviceInfo, error: BaseException,
                steps: int | None = None) -> measure.Measurement:
    """A row that records why `name` could not be measured: `extra["error"]`, and no figures."""
    return measure.new_row(model, name, device, steps=steps, extra={"error": f"{type(error).__name__}: {error}"[:1000]})


def describe(row: measure.Measurement) -> str:
    """One line: the figures a row has, or the error it records."""
    if row.extra.get("error"):
        return f"{row.recipe}: failed: {row.extra['error'][:400]}"
    shown = {"after load GiB": row.mem_after_load_gib, "peak GiB": row.peak_gpu_mem_gib,
             "host RSS GiB": row.peak_host_rss_gib, "ms/step": row.ms_per_step, "s/image": row.s_per_image,
             "PSNR dB": row.psnr_db, **{key: row.extra.get(key) for key in (
                 "sqnr_db", "compile_s", "first_call_s", "first_image_s", "compiled_vs_eager_sqnr_db",
                 "without_cuda_graph_ms", "attention_ms", "tflops", "peak_host_anon_gib")}}
    figures = ", ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                        for key, value in shown.items() if value is not None)
    flag = " [COMPILED OUTPUT DISAGREES WITH EAGER]" if row.extra.get("compile_disagrees") else ""
    return f"{row.recipe}: {figures}{flag}"


# The inductor settings that a recipe may change process-wide: the flux-fast flags, and those that torchao's
# recommended_inductor_config_setter() changes for good.
_INDUCTOR_SETTINGS = ("conv_1x1_as_mm", "epilogue_fusion", "coordinate_descent_tuning",
                      "coordinate_descent_check_all_directions", "force_fuse_int_mm_with_mul", "fx_graph_cache",
                      "triton.unique_kernel_names")


@contextlib.contextmanager
def _fresh_process_state():
    """Each scenario starts from PyTorch's defaults: no compiled graphs, the native attention backend (which
    set_attention_backend() changes for the whole process), inductor's own settings; afterwards, memory is freed."""
    import torch._inductor.config as inductor_config
    from diffusers.models.attention_dispatch import attention_backend

    torch._dynamo.reset()
    saved = {key: inductor_config.get_config_copy()[key] for key in _INDUCTOR_SETTINGS}
    try:
        with attention_backend("native"), inductor_config.patch(saved):
            yield
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_scenarios(scenarios: Iterable[Scenario], out: str | Path, *, model: str,
                  device: str | None = None) -> list[measure.Measurement]:
    """Measure each scenario, saving every row to `out` (a .json of rows; other rows already in it are kept)."""
    scenarios = list(scenarios)
    names = [s.name for s in scenarios]
    if len(set(names)) != len(names):
        raise ValueError(f"Two scenarios share a name: {sorted(n for n in names if names.count(n) > 1)}.")
    out = Path(out)
    rows = measure.load_rows(out) if out.exists() else []
    device = device or env.default_device()
    print(env.report(device), flush=True)
    measured = []
    for scenario in scenarios:
        print(f"{scenario.name}: starting at {time.strftime('%H:%M:%S')}", flush=True)
        try:
            with _fresh_process_state():
                measure.reset_peak_gpu_memory(device)
                row = scenario.measure()
        except Exception as error:  # the row says why, and the next scenario still runs
            row = failure_row(model, scenario.name, device, error)
        rows = [r for r in rows if r.recipe != scenario.name] + [row]
        measure.save_rows(rows, out)
        measured.append(row)
        print(describe(row), flush=True)
    print(f"wrote {len(measured)} rows to {out}", flush=True)
    return measured


def common_arguments(parser: argparse.ArgumentParser, model: str | None = "flux-dev-shaped") -> None:
    """The arguments every lab tool takes: the model, the image size, timing repeats and the results file."""
    parser.add_argument("--model", default=model, help=f"one of: {', '.join(models.list_models())}")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", required=True, help="a .json file of rows; rows of other names already in it stay")


def random_transformer_inputs(config, height: int = 1024, width: int = 1024, text_tokens: int = 512,
                              device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                              seed: int = 0) -> dict[str, Any]:
    """Inputs for one FLUX transformer call at `height`×`width`, drawn from a seeded normal distribution.

    Shaped as `FluxPipeline` shapes them (2×2 latent patches of an 8× smaller latent, position ids,
    timestep in [0, 1], guidance 3.5), from the transformer's `config` alone: for comparing a
    full-size transformer with its quantized self without loading the text encoders.
    """
    from diffusers import FluxPipeline

    generator = torch.Generator("cpu").manual_seed(seed)
    rows, cols = height // 16, width // 16  # the VAE divides by 8, then 2x2 patches are packed

    def normal(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    return {
        "hidden_states": normal(1, rows * cols, config["in_channels"]),
        "encoder_hidden_states": normal(1, text_tokens, config["joint_attention_dim"]),
        "pooled_projections": normal(1, config["pooled_projection_dim"]),
        "timestep": torch.tensor([0.5], device=device, dtype=dtype),
        "guidance": torch.tensor([3.5], device=device, dtype=dtype) if config.get("guidance_embeds") else None,
        "img_ids": FluxPipeline._prepare_latent_image_ids(1, rows, cols, device, dtype),
        "txt_ids": torch.zeros(text_tokens, 3, device=device, dtype=dtype),
        "return_dict": False,
    }
