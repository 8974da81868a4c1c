"""The speed lab: `python -m quantlab.lab.speed`, how chapter 06's committed rows are made (results/README.md).

Each tool times one thing on a GPU and writes one row per scenario through the one runner loop:

- `--recipes`: a speed recipe on the transformer alone (one denoising step is one forward pass: FLUX.1-dev is
  guidance-distilled), compile time apart, the compiled output checked against the eager one, and with
  `--reference` its SQNR against the bf16 output; `--profile` adds where the time of a step goes by kernel kind;
- `--pipeline-steps N`: the same recipes in a whole `FluxPipeline`, N steps and the VAE;
- `--vae`: the VAE decode alone, plain, `channels_last` and/or compiled;
- `--attention`: attention alone at FLUX.1-dev's shape, with each kernel;
- `--matmuls`: the matmuls of one step alone, shape by shape, in bf16 or fp8;
- `--compute-only`: a recipe's matmul and attention calls alone, recorded from one eager step and replayed.

    python -m quantlab.lab.speed --recipes bf16 bf16+compile-regional --reference /tmp/bf16.safetensors \
        --out results/06_speed_flux-dev-shaped.json
"""

from __future__ import annotations

import argparse
import functools
import gc
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import torch

from .. import env, measure, models, quality, speed
from ..recipes import ATTENTION_BACKENDS, FA3_ATTENTION, Recipe, Speedups, get_recipe
from .hand_written import HAND_WRITTEN, FlashAttention3Processor
from .runner import Scenario, common_arguments, random_transformer_inputs, run_scenarios

__all__ = ["run_speed_recipe", "run_speed_pipeline", "run_vae_decode", "run_attention", "run_matmuls",
           "run_compute_only", "record_compute_calls", "replay_compute_calls", "profile_step", "kernel_kind",
           "KERNEL_KINDS", "CALIBRATION_TIMESTEPS", "main"]

# When the runner times a transformer alone, static fp8 calibrates on random inputs (other seeds than the timed
# ones) at these timesteps.
CALIBRATION_TIMESTEPS = (0.9, 0.5, 0.1)


def _transformer_to_time(steps: Speedups, model: str, height: int, width: int, text_tokens: int, device: str,
                         dtype: torch.dtype, seed: int):
    """`model`'s transformer with seeded random weights, the inputs of the timed step, its TFLOP, and a function
    that calibrates static fp8 (None for other recipes) on other inputs than the timed ones, at three noise levels."""
    transformer = models.build_component(model, "transformer", device=device, dtype=dtype, seed=seed)
    inputs = random_transformer_inputs(transformer.config, height, width, text_tokens, device=device, dtype=dtype,
                                       seed=seed)
    calibrate = None
    if steps.activations == "float8static-tensor":
        calibration = [{**random_transformer_inputs(transformer.config, height, width, text_tokens, device=device,
                                                    dtype=dtype, seed=seed + 1 + i),
                        "timestep": torch.tensor([t], device=device, dtype=dtype)}
                       for i, t in enumerate(CALIBRATION_TIMESTEPS)]
        calibrate = lambda: [transformer(**c) for c in calibration]  # noqa: E731
    return transformer, inputs, speed.transformer_tflop_per_step(transformer, height, width, text_tokens), calibrate


def _load_reference(path: str | None) -> torch.Tensor | None:
    """The bf16 eager output saved by an earlier run (a safetensors file), or None."""
    if not path or not Path(path).exists():
        return None
    from safetensors.torch import load_file

    return load_file(path)["output"]


def run_speed_recipe(name: str, model: str = "flux-dev-shaped", *, height: int = 1024, width: int = 1024,
                     text_tokens: int = 512, warmup: int = 2, repeats: int = 10, reference: str | None = None,
                     device: str | None = None, seed: int = 0, profile: bool = False) -> measure.Measurement:
    """Time one speed recipe on `model`'s transformer alone: compile time, then the median forward pass.

    The transformer gets the same seeded random weights as the embedded model's folder. The recipe's eager
    part runs first and its output is kept; a compiled recipe's output is then checked against it
    (`quality.compare_compiled`: `extra.compiled_vs_eager_sqnr_db`, `extra.compile_disagrees`). With `reference`
    (a .safetensors file) the output is compared with the one saved there (SQNR in dB); a bf16 eager run saves
    its output there when the file does not exist yet. With `profile=True`, `extra["profile"]` says where the
    time of a step goes (`profile_step`).
    """
    from torch._dynamo.utils import counters

    recipe = get_recipe(name)
    device = device or env.default_device()
    info = env.device_info(device)
    recipe.check(info)
    steps = recipe.speedups
    counters.clear()
    dtype = env.default_dtype(info)
    transformer, inputs, tflop, calibrate = _transformer_to_time(steps, model, height, width, text_tokens, device,
                                                                 dtype, seed)
    started = time.perf_counter()
    speed.apply_speedups(transformer, speed.without_compile(steps), device=info, calibrate=calibrate,
                         hand_written=HAND_WRITTEN)
    compiled = steps != speed.without_compile(steps)
    with torch.no_grad():
        eager_output = transformer(**inputs)[0].float().cpu() if compiled else None
    if compiled:
        speed.apply_speedups(transformer, speed.only_compile(steps), device=info, hand_written=HAND_WRITTEN)
    prepare_s = time.perf_counter() - started
    weights = measure.weights_bytes(transformer)
    with torch.no_grad():
        output, first_call_s, timing = measure.time_first_call(lambda: transformer(**inputs)[0], warmup=warmup,
                                                               repeats=repeats, device=device)
    output = output.float().cpu()
    extra: dict[str, Any] = {
        "graphs_compiled": counters["stats"]["unique_graphs"] if steps.compile else 0,
        "first_call_s": first_call_s,
        "prepare_s": prepare_s,
        "compile_s": first_call_s - timing.median_s if steps.compile else None,
        "compiled_region": steps.compiled_region,
        "text_tokens": text_tokens,
        **tflop,
        "achieved_tflops": tflop["total_tflop"] / timing.median_s,
        "floor_bf16_ms": speed.floor_ms_per_step(tflop, info.name),
        "floor_fp8_linears_ms": speed.floor_ms_per_step(tflop, info.name, fp8_linears=True),
        "fa3_fwd": metadata.version("fa3-fwd") if steps.attention in FA3_ATTENTION else None,
        "calibration": (None if calibrate is None else f"{len(CALIBRATION_TIMESTEPS)} random input sets (seeds "
                        f"{seed + 1}-{seed + len(CALIBRATION_TIMESTEPS)}) at timesteps {CALIBRATION_TIMESTEPS}"),
    }
    if steps.cuda_graph:  # the same compiled model, launched kernel by kernel: what the graph saved
        with torch.no_grad():
            eager_launches = measure.time_callable(lambda: transformer.forward.wrapped(**inputs)[0], warmup=1,
                                                   repeats=repeats, device=device)
        extra["without_cuda_graph_ms"] = eager_launches.median_s * 1e3
    if profile:
        with torch.no_grad():
            extra["profile"] = profile_step(lambda: transformer(**inputs), device=device)
    if reference and not Path(reference).exists() and recipe.name == "bf16":
        from safetensors.torch import save_file

        save_file({"output": output.contiguous()}, reference)
    saved = _load_reference(reference)
    if saved is not None:
        extra["sqnr_db"] = quality.sqnr_db(output, saved)
    notes = (f"{model} transformer alone, {height}x{width}, {text_tokens} text tokens, random weights; one step = "
             "one forward pass")
    if compiled:
        check = quality.compare_compiled(output, eager_output, own_error_db=extra.get("sqnr_db"))
        extra.update(compiled_vs_eager_sqnr_db=check.sqnr_db, compile_disagrees=not check.agrees)
        if not check.agrees:
            notes += f"; {check.message}"
    row = measure.new_row(
        model, recipe.name, info, height=height, width=width, steps=1, weights_bytes=weights,
        ms_per_step=timing.median_s * 1e3, ms_per_step_iqr=timing.iqr_s * 1e3, repeats=repeats,
        peak_gpu_mem_gib=measure.peak_gpu_memory_gib(device), notes=notes, extra=extra)
    del transformer
    gc.collect()
    return row


def run_speed_pipeline(name: str, model: str = "flux-dev-shaped", *, height: int = 1024, width: int = 1024,
                       steps: int = 28, repeats: int = 3, prompt: str = speed.CALIBRATION_PROMPT,
                       device: str | None = None, seed: int = 0) -> measure.Measurement:
    """Time one speed recipe inside a whole FluxPipeline: text encoding, `steps` steps and the VAE.

    `pipeline.run_recipe` loads bf16, applies the recipe's speed-ups (static fp8 calibrates on one short
    generation) and checks the compiled transformer against the eager one; the first compiled image is
    timed alone (`extra.first_compiled_image_s`).
    """
    from ..pipeline import run_recipe

    recipe = get_recipe(name)
    run = run_recipe(model, recipe, prompt=prompt, height=height, width=width, steps=steps, seed=seed, warmup=0,
                     repeats=repeats, device=device, progress=True, hand_written=HAND_WRITTEN,
                     notes=f"{model} whole pipeline, {height}x{width}, {steps} steps, random weights")
    run.row.extra["fa3_fwd"] = metadata.version("fa3-fwd") if recipe.speedups.attention in FA3_ATTENTION else None
    return run.row


@dataclass(frozen=True)
class VaeDecode:
    """The VAE decode alone: plain, in `channels_last`, compiled, or both."""

    channels_last: bool = False
    compile: bool = False

    @property
    def name(self) -> str:
        return "vae-decode" + ("+channels-last" if self.channels_last else "") + ("+compile" if self.compile else "")


def run_vae_decode(variant: VaeDecode, model: str = "flux-dev-shaped", *, height: int = 1024, width: int = 1024,
                   warmup: int = 2, repeats: int = 10, device: str | None = None,
                   seed: int = 0) -> measure.Measurement:
    """Time one VAE decode at `height`×`width`."""
    device = device or env.default_device()
    info = env.device_info(device)
    dtype = env.default_dtype(info)
    vae = models.build_component(model, "vae", device=device, dtype=dtype, seed=seed)
    latents = torch.randn(1, vae.config.latent_channels, height // 8, width // 8,
                          generator=torch.Generator("cpu").manual_seed(seed)).to(device, dtype)
    if variant.channels_last:
        vae.to(memory_format=torch.channels_last)
        latents = latents.to(memory_format=torch.channels_last)
    if variant.compile:
        vae.decode = torch.compile(vae.decode)
    measure.reset_peak_gpu_memory(device)
    with torch.no_grad():
        _, first_call_s, timing = measure.time_first_call(lambda: vae.decode(latents), warmup=warmup, repeats=repeats,
                                                          device=device)
    return measure.new_row(
        model, variant.name, info, height=height, width=width, s_per_image=timing.median_s,
        s_per_image_iqr=timing.iqr_s, repeats=repeats, peak_gpu_mem_gib=measure.peak_gpu_memory_gib(device),
        notes=f"{model} VAE decode alone, {height}x{width}",
        extra={"first_call_s": first_call_s, "compile_s": first_call_s - timing.median_s if variant.compile else None},
    )


def attention_fn(kind: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """Attention over (batch, tokens, heads, head_dim) tensors with a key of ATTENTION_BACKENDS or FA3_ATTENTION."""
    if kind in FA3_ATTENTION:
        return FlashAttention3Processor(fp8=kind == "fa3-fp8").attention
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    return functools.partial(dispatch_attention_fn, backend=ATTENTION_BACKENDS[kind])


def run_attention(kind: str, *, tokens: int = 4608, heads: int = 24, head_dim: int = 128, blocks: int = 57,
                  calls: int = 10, warmup: int = 2, repeats: int = 10, device: str | None = None,
                  seed: int = 0) -> measure.Measurement:
    """Time attention alone at FLUX.1-dev's 1024×1024 shape with kernel `kind` (a key of ATTENTION_BACKENDS, or
    fa3 / fa3-fp8); the row is called `attention-<kind>`.

    One FLUX step runs `blocks` (57) attentions of `tokens` (4,096 image + 512 text) by `heads` × `head_dim`;
    `ms_per_step` is 57 of them. `extra.sqnr_db` compares the output with float32 attention on the same
    bf16 inputs (q and k RMS-normalized, as FLUX's are), `extra.tflops` is the rate achieved.
    """
    if kind not in (*ATTENTION_BACKENDS, *FA3_ATTENTION):
        raise ValueError(f"Unknown attention {kind!r}. Valid: {', '.join((*ATTENTION_BACKENDS, *FA3_ATTENTION))}.")
    device = device or env.default_device()
    info = env.device_info(device)
    env.check_hardware(f"attention-{kind}", Speedups(attention=kind).needs(), info)
    dtype = env.default_dtype(info)
    generator = torch.Generator("cpu").manual_seed(seed)
    q, k, v = (torch.randn(1, tokens, heads, head_dim, generator=generator) for _ in range(3))
    q, k = (torch.nn.functional.rms_norm(x, (head_dim,)) for x in (q, k))
    q, k, v = (x.to(device, dtype) for x in (q, k, v))
    attention = attention_fn(kind)
    with torch.no_grad():
        reference = torch.nn.functional.scaled_dot_product_attention(
            *(x.float().transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
        output = attention(q, k, v)
        timing = measure.time_callable(lambda: [attention(q, k, v) for _ in range(calls)], warmup=warmup,
                                       repeats=repeats, device=device)
    call_s = timing.median_s / calls
    tflop = 4 * tokens**2 * heads * head_dim / 1e12  # Q·Kᵀ and P·V, 2 FLOP per multiply-add
    return measure.new_row(
        "flux-dev-shaped", f"attention-{kind}", info, ms_per_step=call_s * blocks * 1e3,
        ms_per_step_iqr=timing.iqr_s / calls * blocks * 1e3,
        repeats=repeats, notes=f"attention alone: batch 1, {tokens} tokens, {heads} heads of {head_dim}, {dtype}; "
        f"ms_per_step is {blocks} calls, one per FLUX block",
        extra={"attention_ms": call_s * 1e3, "tflops": tflop / call_s, "tflop_per_call": tflop,
               "sqnr_db": quality.sqnr_db(output.float(), reference), "output_dtype": str(output.dtype)},
    )


# The operators that do a step's arithmetic, as PyTorch's dispatcher names them: the matmuls (torchao's fp8
# Linears and quantlab's end in `_scaled_mm`, bf16 Linears in `mm` or `addmm`), and attention (FA3's custom op, or
# one of PyTorch's kernels, whose q, k and v are (batch, heads, tokens, head_dim)). A recorded call's own inner
# calls are not recorded again.
_MATMUL_OPS = ("_scaled_mm", "mm", "addmm", "bmm")
_ATTENTION_OPS = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
                  "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_efficient_attention")
_FA3_OPS = ("_flash_attn_forward", "fwd")  # fa3-fwd's custom op, which calls its kernel's op


@dataclass(frozen=True)
class ComputeCall:
    """One matmul or attention call of a step, with the operands it ran on (the same tensors, not copies)."""

    op: Any  # a torch OpOverload, e.g. torch.ops.aten._scaled_mm.default
    args: tuple
    kwargs: dict
    kind: str  # "matmul" or "attention"
    tflop: float  # 2 FLOP per multiply-add, as transformer_tflop_per_step counts


def _compute_call(op, args: tuple, kwargs: dict) -> ComputeCall | None:
    """`op(*args, **kwargs)` as a ComputeCall if it is a matmul or an attention on plain tensors, else None."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if any(type(t) not in (torch.Tensor, torch.nn.Parameter) for t in tensors):
        return None  # a quantized tensor subclass: its own dispatch runs (and is recorded as) the plain call
    name = op.overloadpacket.__name__
    if op.namespace == "fa3_fwd" and name in _FA3_OPS:  # q and k are (batch, tokens, heads, head_dim)
        return ComputeCall(op, args, kwargs, "attention", 4 * args[0].numel() * args[1].shape[1] / 1e12)
    if op.namespace != "aten":
        return None
    if name in _ATTENTION_OPS:
        return ComputeCall(op, args, kwargs, "attention", 4 * args[0].numel() * args[1].shape[-2] / 1e12)
    if name in _MATMUL_OPS:
        a, b = args[1:3] if name == "addmm" else args[:2]
        return ComputeCall(op, args, kwargs, "matmul", 2 * a.numel() * b.shape[-1] / 1e12)
    return None


def record_compute_calls(step: Callable[[], Any]) -> list[ComputeCall]:
    """Run `step()` once, eagerly, and keep each matmul and attention call it makes, in order, with its operands.

    What is left of a step when every elementwise kernel and every wait between kernels is taken away:
    `replay_compute_calls` runs just these, on the step's own data. The kept operands stay in memory.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    calls: list[ComputeCall] = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, op, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            call = _compute_call(op, args, kwargs)
            if call is not None:
                calls.append(call)
            return op(*args, **kwargs)

    with torch.no_grad(), Recorder():
        step()
    return calls


def replay_compute_calls(calls: list[ComputeCall]) -> list[Any]:
    """Run each recorded call again, in order, on its recorded operands; returns their outputs."""
    return [call.op(*call.args, **call.kwargs) for call in calls]



def _eager_part(steps: Speedups) -> Speedups:
    """`steps` without what changes only how its kernels are launched or fused (compile, CUDA graph, GELU form)."""
    return speed.without_compile(steps)


def _eager_name(recipe: Recipe, eager: Speedups) -> str:
    """The name of `recipe` with only its `eager` steps: bf16+fused-qkv for bf16+fused-qkv+compile-regional."""
    suffix = recipe.speedups.suffix()
    if not recipe.name.endswith(suffix):  # named otherwise (the compiled pipelines of chapters 01 and 03)
        return f"{recipe.name}, eager"
    return recipe.name.removesuffix(suffix) + eager.suffix()


def run_compute_only(name: str, model: str = "flux-dev-shaped", *, height: int = 1024, width: int = 1024,
                     text_tokens: int = 512, warmup: int = 2, repeats: int = 10, device: str | None = None,
                     seed: int = 0, profile: bool = False) -> measure.Measurement:
    """Time a recipe's matmuls and attention alone; the row is called `compute-only:<recipe>`.

    The transformer gets the recipe's weights, projections, attention and kernels, and runs one step
    eagerly (compile and the CUDA graph change only how kernels launch). Its matmul and attention calls
    are recorded with their operands (`record_compute_calls`), then replayed back to back, on a GPU as
    one CUDA graph, and timed like a step: the median of `repeats` after `warmup`. This is the fastest
    the step could run at the clock its arithmetic leaves the GPU, with no elementwise work at all.
    """
    recipe = get_recipe(name)
    device = device or env.default_device()
    info = env.device_info(device)
    recipe.check(info)
    eager = _eager_part(recipe.speedups)
    dtype = env.default_dtype(info)
    transformer, inputs, tflop, calibrate = _transformer_to_time(eager, model, height, width, text_tokens, device,
                                                                 dtype, seed)
    with torch.no_grad():
        speed.apply_speedups(transformer, eager, device=info, calibrate=calibrate, hand_written=HAND_WRITTEN)
        transformer(**inputs)  # the first run loads kernels and picks algorithms; the second is recorded
        calls = record_compute_calls(lambda: transformer(**inputs))
        replay = functools.partial(replay_compute_calls, calls)
        if device.startswith("cuda"):
            replay()  # once outside the graph first, so that capturing records no first-call work
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                replay()
            replay = graph.replay
        timing = measure.time_callable(replay, warmup=warmup, repeats=repeats, device=device)
        profiled = profile_step(replay, device=device) if profile else None
    by_kind = {kind: sum(c.tflop for c in calls if c.kind == kind) for kind in ("matmul", "attention")}
    extra: dict[str, Any] = {
        "recorded_from": _eager_name(recipe, eager),
        "text_tokens": text_tokens, "calls": len(calls),
        "calls_by_kind": {kind: sum(c.kind == kind for c in calls) for kind in by_kind},
        "recorded_tflop": by_kind, **tflop, "achieved_tflops": sum(by_kind.values()) / timing.median_s,
        "floor_bf16_ms": speed.floor_ms_per_step(tflop, info.name),
        "floor_fp8_linears_ms": speed.floor_ms_per_step(tflop, info.name, fp8_linears=True),
        "replayed_as": "one CUDA graph" if device.startswith("cuda") else "the calls one by one",
        "fa3_fwd": metadata.version("fa3-fwd") if eager.attention in FA3_ATTENTION else None,
    }
    if profiled:
        extra["profile"] = profiled
    row = measure.new_row(
        model, f"compute-only:{recipe.name}", info, height=height, width=width, steps=1,
        ms_per_step=timing.median_s * 1e3, ms_per_step_iqr=timing.iqr_s * 1e3, repeats=repeats,
        peak_gpu_mem_gib=measure.peak_gpu_memory_gib(device),
        notes=f"{model} transformer alone, {height}x{width}, {text_tokens} text tokens, random weights: only the "
        "step's matmul and attention calls, replayed on the operands one step recorded", extra=extra)
    del transformer, calls
    gc.collect()
    return row


def run_matmuls(dtype_name: str, model: str = "flux-dev-shaped", *, height: int = 1024, width: int = 1024,
                text_tokens: int = 512, calls: int = 10, warmup: int = 2, repeats: int = 10,
                device: str | None = None, seed: int = 0) -> measure.Measurement:
    """Time the matmuls of one FLUX step alone, shape by shape, in "bf16" or "fp8"; the row is `matmuls-<dtype>`.

    Each Linear that one forward pass runs (with fused QKV projections, as every fast recipe has) becomes
    one matmul of its shape on random data with its bias: `F.linear` in bf16, and for fp8 the call
    torchao's per-tensor configs make, `torch._scaled_mm` with fast accumulation and a bf16 output. Each
    distinct shape is timed `calls` times in a row and multiplied by how often a step runs it; the sum,
    `ms_per_step`, is what the step's matmuls cost with nothing between them (`extra.shapes` has each).
    """
    variant = f"matmuls-{dtype_name}"
    if dtype_name not in ("bf16", "fp8"):
        raise ValueError(f"Unknown matmul dtype {dtype_name!r}: bf16 or fp8.")
    device = device or env.default_device()
    info = env.device_info(device)
    if dtype_name == "fp8" and not info.fp8:
        raise env.UnsupportedHardwareError(
            f"{variant} times float8 matmuls, which need a CUDA GPU of compute capability 8.9+ (Ada or Hopper), "
            f"and this device is {info.label}. Instead: matmuls-bf16.")
    if dtype_name == "bf16" and not info.bf16:
        raise env.UnsupportedHardwareError(f"{variant} times bf16 matmuls, which {info.label} does not run; the "
                                       "committed H200 rows are in results/06_speed_matmuls_flux-dev-shaped.json.")
    transformer = models.meta_component(model, "transformer")
    transformer.fuse_qkv_projections()
    counts = speed.linear_shapes(transformer, (height // 16) * (width // 16), text_tokens)
    generator = torch.Generator("cpu").manual_seed(seed)
    shapes, total_s = [], 0.0
    by_flops = sorted(counts.items(), key=lambda item: -item[0][0] * item[0][1] * item[0][2])
    for (rows, inputs, outputs), count in by_flops:
        a, w = (torch.randn(n, inputs, generator=generator).to(device, torch.bfloat16) for n in (rows, outputs))
        bias = torch.randn(outputs, generator=generator).to(device, torch.bfloat16)
        if dtype_name == "fp8":
            one = torch.ones((), device=device)
            a, w = a.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
            matmul = functools.partial(torch._scaled_mm, a, w.t(), scale_a=one, scale_b=one, bias=bias,
                                       out_dtype=torch.bfloat16, use_fast_accum=True)
        else:
            matmul = functools.partial(torch.nn.functional.linear, a, w, bias)
        with torch.no_grad():
            timing = measure.time_callable(lambda: [matmul() for _ in range(calls)], warmup=warmup,
                                           repeats=repeats, device=device)
        call_s = timing.median_s / calls
        total_s += call_s * count
        shapes.append({"rows": rows, "in_features": inputs, "out_features": outputs, "count": count,
                       "ms": call_s * 1e3, "tflops": 2 * rows * inputs * outputs / call_s / 1e12})
        del a, w, bias, matmul
    linear_tflop = speed.transformer_tflop_per_step(transformer, height, width, text_tokens)["linear_tflop"]
    call = "torch._scaled_mm, per-tensor scales, fast accumulation" if dtype_name == "fp8" else "F.linear"
    return measure.new_row(
        model, variant, info, height=height, width=width, ms_per_step=total_s * 1e3, repeats=repeats,
        notes=f"the matmuls of one {model} step ({height}x{width}, {text_tokens} text tokens, fused QKV) alone, "
        f"shape by shape; {call}, bf16 output with bias, random data",
        extra={"linear_tflop": linear_tflop, "achieved_tflops": linear_tflop / total_s, "shapes": shapes},
    )



KERNEL_KINDS = (
    ("rope kernel", ("qk_norm_rope",)),  # quantlab.kernels' own Triton kernels: rope-kernel's,
    ("single-block kernels", ("layer_norm_modulate", "gelu_cat")),  # and single-block-kernels'
    ("matmul", ("triton_tem_",)),
    ("fused by inductor", ("triton_",)),
    ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa", "scaled_dot_product")),
    ("matmul", ("gemm", "cutlass", "nvjet", "xmma", "scaled_mm", "matmul", "aten::mm", "aten::addmm", "aten::bmm",
                "aten::linear", "wgmma")),
)


def kernel_kind(name: str) -> str:
    """'attention', 'matmul', 'fused by inductor', 'rope kernel', 'single-block kernels' or 'other', for a kernel
    or operator name."""
    lowered = name.lower()
    return next((kind for kind, marks in KERNEL_KINDS if any(mark in lowered for mark in marks)), "other")


def profile_step(step, steps: int = 3, device: str = "cuda", top: int = 25) -> dict[str, Any]:
    """Where the time of `step()` goes: milliseconds per call by kernel kind, and the top kernels.

    Runs `step` `steps` times under `torch.profiler` and adds up each kernel's own device time (on a
    CPU, each operator's own CPU time, whose kinds overlap less cleanly). Call it after warming up,
    so that compiling is not in the profile.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        measure.synchronize(device)
    wanted = DeviceType.CUDA if cuda else DeviceType.CPU
    events = [e for e in prof.key_averages() if e.device_type == wanted]
    own_us = {e.key: (e.self_device_time_total if cuda else e.self_cpu_time_total) for e in events}
    by_kind: dict[str, float] = {}
    for name, us in own_us.items():
        by_kind[kernel_kind(name)] = by_kind.get(kernel_kind(name), 0.0) + us / 1000 / steps
    ranked = sorted(own_us.items(), key=lambda item: -item[1])[:top]
    return {"ms_per_step_by_kind": dict(sorted(by_kind.items(), key=lambda item: -item[1])),
            "profiled_ms_per_step": sum(by_kind.values()), "steps": steps,
            "top_kernels": [{"name": name[:160], "kind": kernel_kind(name), "ms_per_step": us / 1000 / steps}
                            for name, us in ranked]}



def main(argv: list[str] | None = None) -> int:
    """`python -m quantlab.lab.speed ... --out FILE`: one row per scenario, saved as each ends."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_arguments(parser)
    parser.add_argument("--recipes", nargs="*", default=[], help="speed recipes, timed on the transformer alone")
    parser.add_argument("--pipeline-steps", type=int, help="time --recipes in a whole pipeline of this many steps")
    parser.add_argument("--vae", nargs="*", choices=("plain", "channels-last", "compile", "channels-last+compile"),
                        default=[], help="VAE decode variants")
    parser.add_argument("--attention", nargs="*", default=[], choices=(*ATTENTION_BACKENDS, *FA3_ATTENTION))
    parser.add_argument("--matmuls", nargs="*", default=[], choices=("bf16", "fp8"))
    parser.add_argument("--compute-only", nargs="*", default=[], help="recipes whose matmuls and attention to replay")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reference", help="a .safetensors file: the bf16 eager output, saved by the first bf16 run")
    parser.add_argument("--profile", action="store_true", help="also profile 3 steps: time by kernel kind")
    args = parser.parse_args(argv)
    size = {"height": args.height or 1024, "width": args.width or 1024}
    timing = {"warmup": args.warmup, "repeats": args.repeats}
    for name in [*args.recipes, *args.compute_only]:
        get_recipe(name)  # every name checked before the first (long) run
    if args.pipeline_steps:
        scenarios = [Scenario(name, functools.partial(run_speed_pipeline, name, args.model, steps=args.pipeline_steps,
                                                      repeats=args.repeats, **size)) for name in args.recipes]
    else:
        scenarios = [Scenario(name, functools.partial(run_speed_recipe, name, args.model, reference=args.reference,
                                                      profile=args.profile, **size, **timing))
                     for name in args.recipes]
    for variant in (VaeDecode("channels-last" in v, "compile" in v) for v in args.vae):
        scenarios.append(Scenario(variant.name, functools.partial(run_vae_decode, variant, args.model, **size,
                                                                  **timing)))
    tokens = (size["height"] // 16) * (size["width"] // 16) + 512
    scenarios += [Scenario(f"attention-{kind}", functools.partial(run_attention, kind, tokens=tokens, **timing))
                  for kind in args.attention]
    scenarios += [Scenario(f"matmuls-{dtype}", functools.partial(run_matmuls, dtype, args.model, **size, **timing))
                  for dtype in args.matmuls]
    scenarios += [Scenario(f"compute-only:{name}", functools.partial(run_compute_only, name, args.model,
                                                                     profile=args.profile, **size, **timing))
                  for name in args.compute_only]
    if not scenarios:
        parser.error("nothing to time: give --recipes, --vae, --attention, --matmuls or --compute-only")
    run_scenarios(scenarios, args.out, model=args.model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
