"""Speed: what makes one FLUX transformer step fast, measured against the compute floor.

A speed recipe is a `+`-joined name: the weights first (`bf16`, or a torchao config that quantizes
the activations too), then any of `fused-qkv`, `attn-<backend>`, `compile[-regional][-<mode>]`,
`inductor-flags`, `gelu-sigmoid`, `rope-kernel`, `single-block-kernels`, `fused-qkv-mlp`, `cuda-graph`
and `vae-channels-last`. For example `float8dq-row+fused-qkv+attn-cudnn+compile-regional+cuda-graph`.
`apply_speed_recipe` always applies them in one order: fused QKV, the attention, the GELU, the weights'
quantization (which static fp8 calibrates through the attention that will run), the single-block kernels
and their fused input projections, the inductor flags, the compile, the CUDA graph, the VAE.
`attn-fa3` and `attn-fa3-fp8` run attention through FlashAttention-3 (`FlashAttention3Processor`,
Hopper GPUs, the fa3-fwd package); with `attn-fa3-fp8` and `fused-qkv`, `rope-kernel` computes what comes
between the QKV projection and FA3 in one hand-written Triton kernel (`quantlab.kernels`), and with
static fp8 too, `single-block-kernels` runs the single-stream blocks' LayerNorm and GELU, each with its
fp8 casts, in two more (`use_single_block_kernels`); `fused-qkv-mlp` then runs each single-stream block's
QKV and MLP projections as one fp8 matmul (`fuse_single_block_projections`).
`apply_speed_recipe` applies one to a pipeline (or a bare transformer) with the real diffusers,
torchao and torch calls; `make_fast` applies the fastest measured recipe that runs here.
`python -m quantlab.speed` times recipes on a transformer alone: one denoising step is one
transformer forward pass (FLUX.1-dev is guidance-distilled, so there is no second pass for CFG).
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib.util
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import torch

from . import env, kernels, measure, models
from .recipes import UnsupportedHardwareError

__all__ = [
    "SpeedRecipe",
    "CudaGraphForward",
    "FlashAttention3Processor",
    "SigmoidGELU",
    "gelu_tanh_via_sigmoid",
    "use_sigmoid_gelu",
    "FA3_ATTENTION",
    "FA3_REQUIREMENT",
    "SPEED_RESULTS",
    "QUANTIZATIONS",
    "ATTENTION_BACKENDS",
    "COMPILE_MODES",
    "INDUCTOR_FLAGS",
    "PEAK_DENSE_TFLOPS",
    "parse_speed_recipe",
    "ComputeCall",
    "record_compute_calls",
    "replay_compute_calls",
    "run_compute_only",
    "check_speed_recipe",
    "apply_speed_recipe",
    "speed_results",
    "fastest_recipe",
    "make_fast",
    "use_sigmoid_gelu",
    "use_single_block_kernels",
    "static_fp8_linear",
    "fuse_single_block_projections",
    "join_qkv_mlp_weights",
    "joined_qkv_mlp_linear",
    "transformer_tflop_per_step",
    "peak_tflops",
    "floor_ms_per_step",
    "amortized_s_per_image",
    "break_even_images",
    "run_speed_recipe",
    "run_speed_pipeline",
    "run_vae_decode",
    "attention_fn",
    "run_attention",
    "run_matmuls",
    "speed_table",
    "KERNEL_KINDS",
    "kernel_kind",
    "profile_step",
]

# torchao configs that quantize the activations too, so the matmuls themselves run in 8 bits. The `dq` ones
# find each activation's scale while running (dynamic); `float8static-tensor` uses one scale per Linear,
# observed once on calibration inputs (torchao's Float8StaticActivationFloat8WeightConfig, prepare then convert).
QUANTIZATIONS = ("float8dq-row", "float8dq-tensor", "float8static-tensor", "int8dq")
_FP8 = ("float8dq-row", "float8dq-tensor", "float8static-tensor")

# Our short names for diffusers' attention backends that come with PyTorch (no extra package).
ATTENTION_BACKENDS = {
    "native": "native",  # PyTorch's SDPA picks a kernel itself
    "flash": "_native_flash",
    "cudnn": "_native_cudnn",
    "efficient": "_native_efficient",
    "math": "_native_math",
}
_CUDA_ONLY_ATTENTION = ("flash", "cudnn", "efficient")
_AMPERE_ATTENTION = ("flash", "cudnn")  # these two kernels need compute capability 8.0+

# Attention through FlashAttention-3, which PyTorch does not ship: `fa3` in bf16, `fa3-fp8` on q, k and v cast to
# float8 e4m3 (as the PyTorch team's flux-fast does). FA3 is written for Hopper (compute capability 9.0). Its
# forward-only wheel on PyPI is the extra `hopper` in pyproject.toml, where this pin is set too.
FA3_ATTENTION = ("fa3", "fa3-fp8")
FA3_REQUIREMENT = "fa3-fwd==0.0.3"

# torch.compile modes; "default" passes no mode. The last two capture CUDA graphs.
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead")

# The inductor settings of the PyTorch team's flux-fast recipe: tune each generated kernel's launch
# configuration by coordinate descent (slower compiles), and leave matmul epilogues to cuBLAS.
INDUCTOR_FLAGS = {
    "conv_1x1_as_mm": True,
    "epilogue_fusion": False,
    "coordinate_descent_tuning": True,
    "coordinate_descent_check_all_directions": True,
}

# Dense tensor-core peak of each GPU the course meets, in TFLOP/s (NVIDIA datasheets, without sparsity).
PEAK_DENSE_TFLOPS = {
    "H100 PCIe": {"bf16": 756.0, "fp8": 1513.0},
    "H100": {"bf16": 989.4, "fp8": 1978.9},  # SXM; also the H100 80GB HBM3 the GPU box lends
    "H200": {"bf16": 989.4, "fp8": 1978.9},
    "L40S": {"bf16": 362.0, "fp8": 733.0},  # before "L4", which its name contains
    "A100": {"bf16": 312.0, "fp8": None},
    "L4": {"bf16": 121.0, "fp8": 242.0},
    "T4": {"bf16": None, "fp8": None},  # fp16 only: 65 TFLOP/s
}


@dataclass(frozen=True)
class SpeedRecipe:
    """The steps of one speed recipe (`apply_speed_recipe` says in which order they are applied)."""

    name: str
    quantization: str | None = None  # one of QUANTIZATIONS, None for bf16/fp16 weights
    fuse_qkv: bool = False
    attention: str | None = None  # a key of ATTENTION_BACKENDS, or one of FA3_ATTENTION
    compile_mode: str | None = None  # one of COMPILE_MODES, None for eager
    regional: bool = False  # compile_repeated_blocks() rather than the whole transformer
    inductor_flags: bool = False  # INDUCTOR_FLAGS, set process-wide before compiling
    gelu_sigmoid: bool = False  # GELU(tanh) computed as x·σ(2z), the same function (SigmoidGELU)
    rope_kernel: bool = False  # q/k RMSNorm, RoPE and the fp8 casts in one Triton kernel (kernels.qk_norm_rope_fp8)
    single_block_kernels: bool = False  # the single-stream blocks' norm and GELU in Triton (use_single_block_kernels)
    fused_qkv_mlp: bool = False  # their QKV and MLP projections as one fp8 matmul (fuse_single_block_projections)
    cuda_graph: bool = False  # record the transformer's forward pass once and replay it (CudaGraphForward)
    vae_channels_last: bool = False

    @property
    def compiled_region(self) -> str | None:
        """What torch.compile compiles: 'repeated blocks', 'whole transformer', or None when eager."""
        if not self.compile_mode:
            return None
        return "repeated blocks" if self.regional else "whole transformer"

    @property
    def fp8(self) -> bool:
        """Whether the matmuls run in float8."""
        return self.quantization in _FP8


def parse_speed_recipe(name: str | SpeedRecipe) -> SpeedRecipe:
    """Read a recipe name such as `bf16+fused-qkv+compile-regional`; `ValueError` names what is wrong."""
    if isinstance(name, SpeedRecipe):
        return name
    weights, *steps = name.split("+")
    if weights not in ("bf16", *QUANTIZATIONS):
        raise ValueError(f"Speed recipe {name!r} must start with the weights: bf16 or one of {', '.join(QUANTIZATIONS)}.")
    recipe = SpeedRecipe(name, quantization=None if weights == "bf16" else weights)
    for step in steps:
        if step == "fused-qkv":
            recipe = replace(recipe, fuse_qkv=True)
        elif step == "cuda-graph":
            recipe = replace(recipe, cuda_graph=True)
        elif step == "inductor-flags":
            recipe = replace(recipe, inductor_flags=True)
        elif step == "gelu-sigmoid":
            recipe = replace(recipe, gelu_sigmoid=True)
        elif step == "rope-kernel":
            recipe = replace(recipe, rope_kernel=True)
        elif step == "single-block-kernels":
            recipe = replace(recipe, single_block_kernels=True)
        elif step == "fused-qkv-mlp":
            recipe = replace(recipe, fused_qkv_mlp=True)
        elif step == "vae-channels-last":
            recipe = replace(recipe, vae_channels_last=True)
        elif step.startswith("attn-") and (step[5:] in ATTENTION_BACKENDS or step[5:] in FA3_ATTENTION):
            recipe = replace(recipe, attention=step[5:])
        elif step == "compile" or step.startswith("compile-"):
            rest = step[len("compile"):].lstrip("-")
            regional = rest == "regional" or rest.startswith("regional-")
            mode = rest[len("regional"):].lstrip("-") if regional else rest
            if mode and mode not in COMPILE_MODES:
                raise ValueError(f"Unknown compile mode {mode!r} in {name!r}. Modes: {', '.join(COMPILE_MODES)}.")
            recipe = replace(recipe, compile_mode=mode or "default", regional=regional)
        else:
            raise ValueError(
                f"Unknown step {step!r} in speed recipe {name!r}. Steps: fused-qkv, "
                f"attn-{{{','.join((*ATTENTION_BACKENDS, *FA3_ATTENTION))}}}, "
                f"compile[-regional][-{{{','.join(COMPILE_MODES)}}}], "
                "inductor-flags, gelu-sigmoid, rope-kernel, single-block-kernels, fused-qkv-mlp, cuda-graph, "
                "vae-channels-last."
            )
    if recipe.inductor_flags and not recipe.compile_mode:
        raise ValueError(f"Speed recipe {name!r}: inductor-flags set how torch.compile compiles; add a compile step.")
    if recipe.gelu_sigmoid and not recipe.compile_mode:
        raise ValueError(f"Speed recipe {name!r}: gelu-sigmoid rewrites the GELU for the kernels torch.compile "
                         "generates; eager, it only adds kernel launches. Add a compile step.")
    if recipe.rope_kernel and not (recipe.attention == "fa3-fp8" and recipe.fuse_qkv):
        raise ValueError(f"Speed recipe {name!r}: rope-kernel reads the fused QKV projection and writes fp8 q, k and v "
                         "for FlashAttention-3: add fused-qkv and attn-fa3-fp8.")
    if recipe.single_block_kernels and not (recipe.quantization == "float8static-tensor" and recipe.rope_kernel):
        raise ValueError(f"Speed recipe {name!r}: single-block-kernels quantizes to fp8 with each Linear's static "
                         "scale and hands its output to the rope kernel: start with float8static-tensor, and add "
                         "fused-qkv, attn-fa3-fp8 and rope-kernel.")
    if recipe.fused_qkv_mlp and not recipe.single_block_kernels:
        raise ValueError(f"Speed recipe {name!r}: fused-qkv-mlp joins two Linears that only the single-block "
                         "kernels' forward calls as one matmul (diffusers' block forward calls them one by one): "
                         "add single-block-kernels (and what it needs).")
    if recipe.cuda_graph and recipe.compile_mode and not recipe.regional:
        raise ValueError(
            f"Speed recipe {name!r}: cuda-graph records the transformer's forward pass, which a whole-model "
            "compile replaces with its own. Instead: compile-regional+cuda-graph, or compile-reduce-overhead, "
            "with which torch.compile records CUDA graphs itself."
        )
    return recipe


def check_speed_recipe(recipe: str | SpeedRecipe, device: env.DeviceInfo | None = None,
                       packages: bool = True) -> SpeedRecipe:
    """Raise `UnsupportedHardwareError` if `recipe` cannot run on `device`; changes nothing.

    With `packages` (the default), a package that a step needs beyond the course's pins (FA3) must be
    installed here too; `packages=False` asks about the hardware alone, for a GPU described, not present.
    """
    recipe = parse_speed_recipe(recipe)
    device = device or env.device_info()
    if recipe.fp8 and not device.fp8:
        raise UnsupportedHardwareError(
            f"Speed recipe {recipe.name!r} runs its matmuls in float8, which needs a CUDA GPU of compute "
            f"capability 8.9+ (Ada or Hopper), and this device is {device.label}. Instead: int8dq, or bf16 "
            "(fp16 on a T4) with fused-qkv and compile-regional; `ql.speed.fastest_recipe()` picks the "
            "fastest measured one that runs here."
        )
    if recipe.cuda_graph and device.kind != "cuda":
        raise UnsupportedHardwareError(
            f"Speed recipe {recipe.name!r}: a CUDA graph records CUDA kernels, and this device is {device.label}. "
            "Instead: leave out cuda-graph; on a CPU, compile-regional is the step that pays."
        )
    if recipe.attention in _CUDA_ONLY_ATTENTION and device.kind != "cuda":
        raise UnsupportedHardwareError(
            f"Speed recipe {recipe.name!r}: the {recipe.attention} attention kernel is a CUDA kernel, and this "
            f"device is {device.label}. Instead: attn-native, which lets PyTorch pick a CPU kernel."
        )
    cc = device.compute_capability
    if recipe.attention in FA3_ATTENTION:
        if device.kind != "cuda" or cc is None or cc[0] != 9:
            raise UnsupportedHardwareError(
                f"Speed recipe {recipe.name!r}: FlashAttention-3 is written for Hopper GPUs (compute capability 9.0: "
                f"H100, H200), and this device is {device.label}. Instead: attn-cudnn on a GPU of compute "
                "capability 8.0+, attn-native elsewhere."
            )
        problem = _fa3_problem() if packages else None
        if problem:
            raise UnsupportedHardwareError(
                f"Speed recipe {recipe.name!r} needs FlashAttention-3, which is {problem}. Install its "
                f"forward-only build with `pip install {FA3_REQUIREMENT}` (a CUDA 13 wheel for torch 2.10+; or "
                "`pip install -e .[hopper]`), or use attn-cudnn, PyTorch's own fastest kernel on Hopper."
            )
    problem = kernels.triton_problem() if recipe.rope_kernel and packages else None
    if problem:
        steps, run = (("rope-kernel and single-block-kernels", "run Triton kernels") if recipe.single_block_kernels
                      else ("rope-kernel", "is a Triton kernel"))
        raise UnsupportedHardwareError(
            f"Speed recipe {recipe.name!r}: {steps} {run} for CUDA GPUs, and {problem}. "
            f"Instead: leave out {steps}; torch.compile fuses the same steps into its own kernels."
        )
    if recipe.attention in _AMPERE_ATTENTION and cc is not None and cc < (8, 0):
        raise UnsupportedHardwareError(
            f"Speed recipe {recipe.name!r}: the {recipe.attention} attention kernel needs compute capability 8.0+, "
            f"and {device.label} has {cc[0]}.{cc[1]}. Instead: attn-efficient or attn-native."
        )
    return recipe


def _fa3_problem() -> str | None:
    """Why FlashAttention-3 cannot be used here ('not installed here', or why it does not load), or None."""
    if importlib.util.find_spec("fa3_fwd_interface") is None:
        return "not installed here"
    try:  # the wheel loads a CUDA 13 runtime: installed is not the same as usable
        importlib.import_module("fa3_fwd_interface")
    except (ImportError, OSError, RuntimeError) as error:
        return f"installed here but does not load ({type(error).__name__}: {str(error)[:200]})"
    return None


def _quantization_config(name: str, step: str | None = None):
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int8DynamicActivationInt8WeightConfig,
        PerRow,
        PerTensor,
    )

    if name == "int8dq":
        return Int8DynamicActivationInt8WeightConfig()
    if name == "float8static-tensor":
        from torchao.quantization import Float8StaticActivationFloat8WeightConfig

        return Float8StaticActivationFloat8WeightConfig(step=step)
    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow() if name == "float8dq-row" else PerTensor())


# What static fp8 observes when `apply_speed_recipe` is given a whole pipeline and no `calibrate`: one short
# generation, so that the observers see the activations of several denoising steps.
CALIBRATION_PROMPT = PIPELINE_PROMPT = "a photo of a cat sitting on a red chair in a sunny room"  # the runner's too
CALIBRATION_STEPS = 4
# ...and when the runner times a transformer alone: random inputs (other seeds than the timed ones) at these timesteps.
CALIBRATION_TIMESTEPS = (0.9, 0.5, 0.1)


def apply_speed_recipe(pipe, recipe: str | SpeedRecipe, device: env.DeviceInfo | None = None,
                       calibrate: Callable[[], Any] | None = None):
    """Apply `recipe` to a FluxPipeline, or to a bare FluxTransformer2DModel, in place; returns it.

    The hardware checks happen first, so a recipe this device cannot run changes nothing. A
    `float8static-tensor` recipe runs `calibrate()` between torchao's prepare and convert steps, so
    that each Linear's observer sees representative activations; for a pipeline it defaults to one
    generation of `CALIBRATION_STEPS` steps, and a bare transformer needs one.
    """
    recipe = check_speed_recipe(recipe, device or env.device_info(_module_device(pipe)))
    transformer = getattr(pipe, "transformer", pipe)
    if recipe.vae_channels_last and not hasattr(pipe, "vae"):
        raise ValueError(f"Speed recipe {recipe.name!r} changes the VAE; pass the whole pipeline, not a transformer.")
    if recipe.single_block_kernels:  # before anything changes
        _check_bf16_for_single_block_kernels(transformer)
    static = recipe.quantization == "float8static-tensor"
    if static and calibrate is None:
        if transformer is pipe:
            raise ValueError(f"Speed recipe {recipe.name!r} observes each activation's range before it quantizes: "
                             "pass calibrate=, a function that runs the transformer on representative inputs.")
        calibrate = functools.partial(pipe, CALIBRATION_PROMPT, num_inference_steps=CALIBRATION_STEPS,
                                      output_type="latent")
    if recipe.fuse_qkv:  # before quantizing, so that the fused Linear is the one quantized
        transformer.fuse_qkv_projections()
    if recipe.attention in FA3_ATTENTION:  # before calibrating, so that the observers see what will run
        transformer.set_attn_processor(FlashAttention3Processor(fp8=recipe.attention == "fa3-fp8",
                                                                rope_kernel=recipe.rope_kernel))
    elif recipe.attention:
        transformer.set_attention_backend(ATTENTION_BACKENDS[recipe.attention])
    if recipe.gelu_sigmoid:
        use_sigmoid_gelu(transformer)
    if recipe.quantization:
        from torchao.quantization import quantize_

        if static:  # observers on every Linear that runs, one pass over the calibration inputs, then fp8
            unused = _unused_projections(transformer)  # an observer that never saw an input has no range
            used = lambda module, name: isinstance(module, torch.nn.Linear) and name not in unused  # noqa: E731
            quantize_(transformer, _quantization_config(recipe.quantization, step="prepare"), filter_fn=used)
            with torch.no_grad():
                calibrate()
            quantize_(transformer, _quantization_config(recipe.quantization, step="convert"),
                      filter_fn=lambda module, name: hasattr(module, "input_act_obs"))  # the observed ones
        else:
            quantize_(transformer, _quantization_config(recipe.quantization))
    if recipe.single_block_kernels:  # after quantizing: the kernels quantize with the scales calibration found
        use_single_block_kernels(transformer)
    if recipe.fused_qkv_mlp:
        fuse_single_block_projections(transformer)
    if recipe.inductor_flags:  # process-wide, like the flags in flux-fast; run_speed_recipe puts them back
        import torch._inductor.config as inductor_config

        for flag, value in INDUCTOR_FLAGS.items():
            setattr(inductor_config, flag, value)
    if recipe.compile_mode:
        options = {"fullgraph": True, "mode": None if recipe.compile_mode == "default" else recipe.compile_mode}
        if recipe.regional:
            transformer.compile_repeated_blocks(**options)
        else:
            transformer.compile(**options)
    if recipe.cuda_graph:
        transformer.forward = CudaGraphForward(transformer.forward)
    if recipe.vae_channels_last:
        pipe.vae.to(memory_format=torch.channels_last)
    return pipe


class CudaGraphForward:
    """A module's `forward`, recorded as one CUDA graph per input shape and replayed after that.

    Once a step's kernels are fast, launching them costs time too: Python, dynamo's guards and
    torchao's tensor subclasses run on the CPU for each of the thousands of kernels in a FLUX step,
    and the GPU waits in between. A CUDA graph records every kernel of one call; `replay()` launches
    them all at once. The price: each new input shape records a new graph, the inputs are copied into
    the recorded tensors, nothing inside may wait for the GPU (no `.item()`), the recorded
    activations stay allocated, and it is for inference only (it records under `torch.no_grad()`).
    Install it with `transformer.forward = CudaGraphForward(transformer.forward)`.
    """

    def __init__(self, forward, warmup: int = 2):
        self.wrapped = forward  # the original forward, eager or with compiled blocks inside
        self.warmup = warmup
        self.graphs: dict[Any, tuple[torch.cuda.CUDAGraph, list, Any]] = {}

    def __call__(self, *args, **kwargs):
        from torch.utils._pytree import tree_flatten, tree_map

        leaves, spec = tree_flatten((args, kwargs))
        key = (str(spec), tuple((tuple(x.shape), x.dtype, str(x.device)) if isinstance(x, torch.Tensor) else repr(x)
                                for x in leaves))
        if key not in self.graphs:
            self.graphs[key] = self._record(leaves, spec)
        graph, static_leaves, static_output = self.graphs[key]
        for static, value in zip(static_leaves, leaves):
            if isinstance(static, torch.Tensor):
                static.copy_(value)
        graph.replay()
        # the next replay overwrites the recorded output: hand out a copy
        return tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, static_output)

    def _record(self, leaves: list, spec):
        from torch.utils._pytree import tree_unflatten

        static_leaves = [x.clone() if isinstance(x, torch.Tensor) else x for x in leaves]
        args, kwargs = tree_unflatten(static_leaves, spec)
        with torch.no_grad():
            # warm up on a side stream (compiling, cuBLAS and cuDNN plans, lazy allocations), then record
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self.wrapped(*args, **kwargs)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                output = self.wrapped(*args, **kwargs)
        return graph, static_leaves, output


class FlashAttention3Processor:
    """diffusers' FLUX attention processor, with the attention itself computed by FlashAttention-3.

    Everything before and after the attention call is what diffusers' `FluxAttnProcessor` does, step
    for step (tests/test_speed.py checks that the outputs are identical): the (fused) QKV projections,
    RMSNorm on q and k, the text and image streams joined, RoPE, the output projections. With
    `fp8=True`, q, k and v are cast to float8 e4m3 first, without scales, as flux-fast does: after the
    RMSNorm, q and k sit far inside e4m3's ±448 (v is not normalized: the cast clips it there). FA3
    then runs both attention matmuls in fp8 on Hopper's tensor cores (twice the bf16 rate) and returns
    bf16. Install it on every attention layer with
    `transformer.set_attn_processor(FlashAttention3Processor(fp8=True))`. With `rope_kernel=True` too, and
    fused projections, the RMSNorms, the RoPE and the casts run in one Triton kernel instead
    (`kernels.qk_norm_rope_fp8`), which rounds where diffusers' code does.
    """

    _attention_backend = None  # diffusers' set_attention_backend() sets these on every processor;
    _parallel_config = None  # this one always calls FA3, and runs on one GPU

    def __init__(self, fp8: bool = False, rope_kernel: bool = False):
        if rope_kernel and not fp8:
            raise ValueError("rope_kernel=True writes q, k and v in fp8: use it with fp8=True.")
        self.fp8 = fp8
        self.rope_kernel = rope_kernel

    def attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Attention over (batch, tokens, heads, head_dim) tensors, returned in the same layout."""
        from fa3_fwd_interface import flash_attn_func

        if self.fp8:
            query, key, value = (x.to(torch.float8_e4m3fn) for x in (query, key, value))
        return flash_attn_func(query, key, value)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: torch.Tensor | None = None):
        if attention_mask is not None:
            raise ValueError("FlashAttention3Processor takes no attention mask; FLUX.1 passes none.")
        qkv = (self._rope_kernel_qkv if self.rope_kernel else self._unfused_qkv)(
            attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        hidden_states = self.attention(*qkv).flatten(2, 3).to(hidden_states.dtype)
        if encoder_hidden_states is None:
            return hidden_states
        text_tokens = encoder_hidden_states.shape[1]
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [text_tokens, hidden_states.shape[1] - text_tokens], dim=1)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        return hidden_states, attn.to_add_out(encoder_hidden_states.contiguous())

    @staticmethod
    def _rope_kernel_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb):
        """fp8 q, k and v from the fused projections, by `kernels.qk_norm_rope_fp8` (one Triton kernel per stream)."""
        if not attn.fused_projections or image_rotary_emb is None:
            raise ValueError("rope_kernel=True reads the fused QKV projection and applies FLUX's rotary embedding: "
                             "call transformer.fuse_qkv_projections() first, and pass image_rotary_emb.")
        text = ()
        if attn.added_kv_proj_dim is not None:  # a double-stream block: the text stream goes first
            text = (attn.to_added_qkv(encoder_hidden_states), attn.norm_added_q, attn.norm_added_k)
        return kernels.qk_norm_rope_fp8(attn.to_qkv(hidden_states), attn.norm_q, attn.norm_k, image_rotary_emb,
                                        attn.heads, *text)

    @staticmethod
    def _unfused_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb):
        """q, k and v for the attention call, by diffusers' steps: projections, RMSNorms, streams joined, RoPE."""
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states)
        query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:  # a double-stream block: the text stream goes first
            encoder_query, encoder_key, encoder_value = (
                x.unflatten(-1, (-1, attn.head_dim)) for x in (encoder_query, encoder_key, encoder_value))
            encoder_query, encoder_key = attn.norm_added_q(encoder_query), attn.norm_added_k(encoder_key)
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        return query, key, value


def _keep_fp8_operands(linear: torch.nn.Module) -> None:
    """Put a static-fp8 Linear's `torch._scaled_mm` operands on it as plain buffers (views; nothing is copied)."""
    weight = linear.weight
    linear.register_buffer("fp8_weight_t", weight.qdata.t(), persistent=False)  # column-major, as cuBLAS wants it
    linear.register_buffer("fp8_weight_scale", weight.scale.reshape(1, 1), persistent=False)
    linear.register_buffer("fp8_input_scale", weight.act_quant_scale.reshape(1, 1), persistent=False)
    linear.fp8_fast_accumulation = weight.mm_config.use_fast_accum


def _check_bf16_for_single_block_kernels(transformer: torch.nn.Module) -> None:
    if transformer.dtype != torch.bfloat16:
        raise ValueError(f"single-block-kernels round as PyTorch does on bf16 activations, and this transformer is "
                         f"{transformer.dtype}. Instead: load it in bf16, or leave out single-block-kernels.")


def _single_block_kernels_problem(block: torch.nn.Module) -> str | None:
    """Why `_single_block_with_kernels` cannot run `block` (a FluxSingleTransformerBlock), or None."""
    processor = block.attn.processor
    if not (block.attn.fused_projections and isinstance(processor, FlashAttention3Processor)
            and processor.rope_kernel):
        return ("single-block-kernels hands the fused QKV projection to the rope kernel: call "
                "transformer.fuse_qkv_projections(), then set FlashAttention3Processor(fp8=True, rope_kernel=True), "
                "then quantize with float8static-tensor.")
    act = block.act_mlp
    if not (isinstance(act, SigmoidGELU) or (isinstance(act, torch.nn.GELU) and act.approximate == "tanh")):
        return f"gelu_cat_fp8 computes GELU's tanh form, which FLUX runs, and this block's MLP runs {act}."
    for linear in (block.attn.to_qkv, block.proj_mlp, block.proj_out):
        weight, scale = linear.weight, getattr(linear.weight, "act_quant_scale", None)
        if scale is None or scale.numel() != 1 or weight.scale.numel() != 1:
            return ("single-block-kernels quantizes each Linear's input with the one static scale that torchao's "
                    "Float8StaticActivationFloat8WeightConfig found for it, and this Linear's weight is a "
                    f"{type(weight).__name__}. Instead: quantize with float8static-tensor first.")
    return None


def static_fp8_linear(x: torch.Tensor, linear: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """`linear(x)` for an `x` already in fp8, quantized with the Linear's static input scale: what torchao
    runs after quantizing the input itself (`addmm_float8_unwrapped_inference`: `torch._scaled_mm`), in `dtype`."""
    from torchao.float8.inference import addmm_float8_unwrapped_inference

    out = addmm_float8_unwrapped_inference(x.reshape(-1, x.shape[-1]), linear.fp8_input_scale, linear.fp8_weight_t,
                                           linear.fp8_weight_scale, output_dtype=dtype, bias=linear.bias,
                                           use_fast_accum=linear.fp8_fast_accumulation)
    return out.view(*x.shape[:-1], out.shape[-1])


def _single_block_with_kernels(block, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                               temb: torch.Tensor, image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
                               joint_attention_kwargs: dict[str, Any] | None = None):
    """diffusers' `FluxSingleTransformerBlock.forward`, step for step, with its elementwise work in Triton kernels.

    The three Triton kernels do what torch.compile would fuse: `kernels.layer_norm_modulate_fp8` the
    joining of the streams, the norm, the modulation and the quantization of both Linears' input;
    `kernels.qk_norm_rope_fp8` what comes between the QKV projection and the attention;
    `kernels.gelu_cat_fp8` the GELU, the concatenation and the output projection's quantization. The
    three Linears then run on fp8 inputs (`static_fp8_linear`; after `fuse_single_block_projections`,
    the first two as one matmul, `joined_qkv_mlp_linear`) and the attention is the processor's own.
    """
    if joint_attention_kwargs:
        raise ValueError("single-block-kernels runs FLUX's attention without extra arguments (no LoRA scale, no "
                         "IP-Adapter); leave out single-block-kernels to pass joint_attention_kwargs.")
    attn, text_tokens, dtype = block.attn, encoder_hidden_states.shape[1], hidden_states.dtype
    shift, scale, gate = block.norm.linear(block.norm.silu(temb)).chunk(3, dim=1)  # AdaLayerNormZeroSingle's
    one_matmul = hasattr(block, "fp8_qkv_mlp_weight_t")  # fuse_single_block_projections: one input, one matmul
    linears = (attn.to_qkv,) if one_matmul else (attn.to_qkv, block.proj_mlp)
    residual, *normed = kernels.layer_norm_modulate_fp8(encoder_hidden_states, hidden_states, shift, scale,
                                                        tuple(linear.fp8_input_scale for linear in linears),
                                                        eps=block.norm.norm.eps)
    if one_matmul:
        qkv, mlp = joined_qkv_mlp_linear(normed[0], block, dtype)
    else:
        qkv, mlp = (static_fp8_linear(x, linear, dtype) for x, linear in zip(normed, linears))
    query, key, value = kernels.qk_norm_rope_fp8(qkv, attn.norm_q, attn.norm_k, image_rotary_emb, attn.heads)
    attention = attn.processor.attention(query, key, value).flatten(2, 3).to(dtype)
    for_out = kernels.gelu_cat_fp8(attention, mlp, block.proj_out.fp8_input_scale)
    hidden_states = residual + gate.unsqueeze(1) * static_fp8_linear(for_out, block.proj_out, dtype)
    return hidden_states[:, :text_tokens], hidden_states[:, text_tokens:]


def use_single_block_kernels(transformer: torch.nn.Module) -> int:
    """Run every single-stream block of `transformer` with `_single_block_with_kernels`; returns how many changed.

    Needs what the kernels read: static fp8 weights (`float8static-tensor`: each Linear's input scale is
    known before the block runs), the fused QKV projection, and `FlashAttention3Processor(fp8=True,
    rope_kernel=True)`. The Linears keep their torchao weights; each also gets its operands for
    `torch._scaled_mm` as buffers that share the weight's memory. A second call changes nothing.
    """
    import types

    _check_bf16_for_single_block_kernels(transformer)
    blocks = [block for block in transformer.single_transformer_blocks if "forward" not in block.__dict__]
    problem = next(filter(None, map(_single_block_kernels_problem, blocks)), None)  # all checked, then changed
    if problem:
        raise ValueError(problem)
    for block in blocks:
        for linear in (block.attn.to_qkv, block.proj_mlp, block.proj_out):
            _keep_fp8_operands(linear)
        block.forward = types.MethodType(_single_block_with_kernels, block)
    return len(blocks)


def joined_qkv_mlp_linear(x: torch.Tensor, block: torch.nn.Module,
                          dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`block.attn.to_qkv(x)` and `block.proj_mlp(x)` for an `x` already in fp8, in one `torch._scaled_mm`.

    The matmul reads the joined weights that `fuse_single_block_projections` put on the block, with
    row-wise scales: one per output feature, each its own Linear's per-tensor weight scale, and one
    per token, each the shared static input scale. It returns two views of one output.
    """
    rows = x.reshape(-1, x.shape[-1])
    out = torch._scaled_mm(rows, block.fp8_qkv_mlp_weight_t,
                           scale_a=block.attn.to_qkv.fp8_input_scale.expand(rows.shape[0], 1).contiguous(),
                           scale_b=block.fp8_qkv_mlp_weight_scale, bias=block.fp8_qkv_mlp_bias, out_dtype=dtype,
                           use_fast_accum=block.attn.to_qkv.fp8_fast_accumulation)
    return out.view(*x.shape[:-1], out.shape[-1]).split_with_sizes(block.fp8_qkv_mlp_widths, dim=-1)


def join_qkv_mlp_weights(block: torch.nn.Module) -> None:
    """Join the fp8 weights of `block.attn.to_qkv` and `block.proj_mlp` in memory, for `joined_qkv_mlp_linear`.

    Both Linears need torchao's static fp8 weights (`float8static-tensor`). Each Linear's torchao
    weight then views its rows of the joined weight, so nothing is stored twice and either Linear still
    runs alone; each also gets its `torch._scaled_mm` operands (`_keep_fp8_operands`), as views of the
    joined weight, for `static_fp8_linear`. The views share memory only where they are: moving the
    block to another device afterwards (`.to()`) copies each of them apart.
    """
    linears = (block.attn.to_qkv, block.proj_mlp)
    joined = torch.cat([linear.weight.qdata for linear in linears])
    for linear, rows in zip(linears, joined.split_with_sizes([linear.out_features for linear in linears])):
        linear.weight.qdata = rows
        _keep_fp8_operands(linear)
    scales = [linear.fp8_weight_scale.float().reshape(1).expand(linear.out_features) for linear in linears]
    bias = None
    if any(linear.bias is not None for linear in linears):  # FLUX's have biases; a missing one adds zeros
        dtype = next(linear.bias.dtype for linear in linears if linear.bias is not None)
        bias = torch.cat([linear.bias if linear.bias is not None else joined.new_zeros(linear.out_features,
                                                                                       dtype=dtype)
                          for linear in linears])
    block.register_buffer("fp8_qkv_mlp_weight_t", joined.t(), persistent=False)
    block.register_buffer("fp8_qkv_mlp_weight_scale", torch.cat(scales).reshape(1, -1), persistent=False)
    block.register_buffer("fp8_qkv_mlp_bias", bias, persistent=False)
    block.fp8_qkv_mlp_widths = tuple(linear.out_features for linear in linears)


def _joined_projections_problem(index: int, block: torch.nn.Module) -> str | None:
    """Why `fuse_single_block_projections` cannot join the projections of single-stream block `index`, or None."""
    forward = block.__dict__.get("forward")
    if getattr(forward, "__func__", None) is not _single_block_with_kernels:
        return (f"Single-stream block {index} runs diffusers' own forward, which calls to_qkv and proj_mlp one by "
                "one; fused-qkv-mlp's joined matmul needs the single-block kernels' forward. Instead: call "
                "use_single_block_kernels(transformer) first (the single-block-kernels step).")
    qkv, mlp = block.attn.to_qkv.fp8_input_scale, block.proj_mlp.fp8_input_scale
    if not torch.equal(qkv, mlp):
        return (f"fused-qkv-mlp quantizes the normalized tokens once for both projections, and calibration found "
                f"different input scales for them in single-stream block {index} ({qkv.item():.6g} and "
                f"{mlp.item():.6g}). Instead: calibrate both on the same inputs (apply_speed_recipe does), or "
                "leave out fused-qkv-mlp.")
    return None


def fuse_single_block_projections(transformer: torch.nn.Module) -> int:
    """Run each single-stream block's QKV and MLP projections as one fp8 matmul; returns how many blocks changed.

    Both Linears read the same normalized tokens (BFL's FLUX code holds them as one Linear, `linear1`),
    so static fp8 calibrated one input scale for both, and one fp8 copy of the tokens serves both: the
    LayerNorm kernel writes one output instead of two. `joined_qkv_mlp_linear` then runs the matmul
    with row-wise scales, so each Linear keeps the weight scale torchao gave it: the same products.
    Needs `use_single_block_kernels` first. Every block is checked before any changes; a second call
    changes nothing.
    """
    blocks = {index: block for index, block in enumerate(transformer.single_transformer_blocks)
              if not hasattr(block, "fp8_qkv_mlp_weight_t")}
    problem = next(filter(None, (_joined_projections_problem(index, block) for index, block in blocks.items())), None)
    if problem:
        raise ValueError(problem)
    for block in blocks.values():
        join_qkv_mlp_weights(block)
    return len(blocks)


# GELU's tanh approximation is 0.5·x·(1 + tanh(z)) with z = √(2/π)·(x + 0.044715·x³). Since
# 1 + tanh(z) = 2σ(2z), it is also x·σ(2z): the same function, which FLUX runs after every MLP's first
# Linear. The two forms differ in what inductor generates for them: tanh becomes a call of libdevice's
# tanh, a longer instruction sequence, and σ one fast exponential and a division.
_TWO_SQRT_2_OVER_PI = 2 * (2 / 3.141592653589793) ** 0.5


def gelu_tanh_via_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """`F.gelu(x, approximate="tanh")` as x·σ(2z): in float32 for 16-bit x, returned in x's dtype."""
    wide = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    return (wide * torch.sigmoid(_TWO_SQRT_2_OVER_PI * (wide + 0.044715 * wide * wide * wide))).to(x.dtype)


class SigmoidGELU(torch.nn.Module):
    """`nn.GELU(approximate="tanh")` as x·σ(2z) (`gelu_tanh_via_sigmoid`), for a compiled model."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_tanh_via_sigmoid(x)


def use_sigmoid_gelu(transformer: torch.nn.Module) -> int:
    """Compute every tanh GELU of `transformer` as x·σ(2z); returns how many were changed (0 the second time).

    The single-stream blocks hold an `nn.GELU` (`act_mlp`), which is replaced by a SigmoidGELU; the
    feed-forwards of the double-stream blocks hold diffusers' `GELU`, whose projection stays and whose
    `gelu` method is replaced on the instance.
    """
    from diffusers.models.activations import GELU as DiffusersGELU

    changed = 0
    for name, module in list(transformer.named_modules()):
        if isinstance(module, torch.nn.GELU) and module.approximate == "tanh":
            parent, _, child = name.rpartition(".")
            setattr(transformer.get_submodule(parent), child, SigmoidGELU())
            changed += 1
        elif (isinstance(module, DiffusersGELU) and module.approximate == "tanh"
              and module.__dict__.get("gelu") is not gelu_tanh_via_sigmoid):
            module.gelu = gelu_tanh_via_sigmoid
            changed += 1
    return changed


def _module_device(pipe) -> str:
    module = getattr(pipe, "transformer", pipe)
    return next(module.parameters()).device.type


# The committed transformer-alone runs of this chapter: an H100's, and an H200's (the same compute, faster memory).
SPEED_RESULTS = ("06_speed_flux-dev-shaped", "06_speed_h200_flux-dev-shaped")


def speed_results(results: tuple[str, ...] = SPEED_RESULTS):
    """The committed transformer-alone rows of `results` (the H100's and the H200's runs), as one DataFrame."""
    return measure.to_frame([asdict(row) for name in results
                             for row in measure.load_rows(measure.results_dir() / f"{name}.json")])


def fastest_recipe(device: env.DeviceInfo | None = None, results: tuple[str, ...] = SPEED_RESULTS,
                   tolerance: float = 0.02, packages: bool = True) -> str:
    """The fastest recipe in the committed results (ms per step) that runs on `device`.

    Recipes within `tolerance` (2%) of the fastest count as equally fast, and among those the
    one that compiled quickest wins: a 1 ms difference is noise, a 90 s compile is not. With
    `packages` (the default), a recipe also needs its packages installed here (FA3 for `attn-fa3*`);
    `packages=False` ranks by the device's hardware alone.
    """
    device = device or env.device_info()
    frame = speed_results(results)
    frame = frame[frame["ms_per_step"].notna() & frame["recipe"].str.match(r"^(bf16|float8|int8)")]
    runnable, reasons = [], []
    for row in frame.sort_values("ms_per_step").itertuples():
        try:
            check_speed_recipe(row.recipe, device, packages=packages)
            runnable.append((row.ms_per_step, row.extra.get("compile_s") or 0.0, row.recipe))
        except UnsupportedHardwareError as error:
            reasons.append(str(error))
    if not runnable:
        raise UnsupportedHardwareError(f"No measured speed recipe runs on {device.label}: {reasons[:1]}")
    as_fast = [r for r in runnable if r[0] <= runnable[0][0] * (1 + tolerance)]
    return min(as_fast, key=lambda r: r[1])[2]


def make_fast(pipe, recipe: str | SpeedRecipe | None = None, device: env.DeviceInfo | None = None,
              calibrate: Callable[[], Any] | None = None):
    """Apply `recipe`, or else the fastest measured one that runs on this device, to a FLUX pipeline."""
    device = device or env.device_info(_module_device(pipe))
    return apply_speed_recipe(pipe, recipe or fastest_recipe(device), device, calibrate=calibrate)


# --- the floor --------------------------------------------------------------------------------


def _tokens_of(linear_name: str, image_tokens: int, text_tokens: int) -> int:
    """How many token rows pass through the Linear called `linear_name` in one FLUX forward pass."""
    if linear_name.startswith("time_text_embed") or "norm" in linear_name:
        return 1  # timestep, guidance and pooled-text embeddings, and the AdaLN modulation from them
    if linear_name.startswith("single_transformer_blocks"):
        return image_tokens + text_tokens  # single-stream blocks see the joined sequence
    if "context" in linear_name or "add_" in linear_name or "_added_" in linear_name:
        return text_tokens  # the text stream of the double-stream blocks, and the text embedder
    return image_tokens


def _unused_projections(transformer: torch.nn.Module) -> set[str]:
    """The names of the separate q, k, v projections that fuse_qkv_projections() keeps beside the fused one, unused."""
    return {f"{name}.{projection}" for name, m in transformer.named_modules() if getattr(m, "fused_projections", False)
            for projection in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")}


def _linear_shapes(transformer: torch.nn.Module, image_tokens: int,
                   text_tokens: int) -> dict[tuple[int, int, int], int]:
    """How often one forward pass runs each Linear shape: {(token rows, in_features, out_features): count}.

    Every Linear that runs counts, on the tokens it sees; the unfused projections that
    fuse_qkv_projections() keeps beside the fused ones do not run.
    """
    unused = _unused_projections(transformer)
    counts: dict[tuple[int, int, int], int] = {}
    for name, m in transformer.named_modules():
        if isinstance(m, torch.nn.Linear) and name not in unused:
            shape = (_tokens_of(name, image_tokens, text_tokens), m.in_features, m.out_features)
            counts[shape] = counts.get(shape, 0) + 1
    return counts


def transformer_tflop_per_step(transformer: torch.nn.Module, height: int = 1024, width: int = 1024,
                               text_tokens: int = 512) -> dict[str, float]:
    """TFLOP of one forward pass: every Linear on the tokens it sees, plus attention's two matmuls.

    Counts 2 FLOP per multiply-add, walks the real module tree (the meta device is fine), and
    leaves out elementwise work, which is memory-bound rather than compute-bound.
    """
    image_tokens = (height // 16) * (width // 16)
    linear = sum(2 * rows * inputs * outputs * count
                 for (rows, inputs, outputs), count in _linear_shapes(transformer, image_tokens, text_tokens).items())
    config = transformer.config
    inner = config.num_attention_heads * config.attention_head_dim
    blocks = config.num_layers + config.num_single_layers
    attention = blocks * 2 * 2 * (image_tokens + text_tokens) ** 2 * inner  # Q·Kᵀ and P·V
    return {"linear_tflop": linear / 1e12, "attention_tflop": attention / 1e12,
            "total_tflop": (linear + attention) / 1e12}


def peak_tflops(device_name: str, dtype: str = "bf16") -> float | None:
    """Dense tensor-core peak of the GPU called `device_name` in `dtype`, or None if unknown."""
    for key in PEAK_DENSE_TFLOPS:  # "H100 PCIe" before "H100"
        if key in device_name:
            return PEAK_DENSE_TFLOPS[key].get(dtype)
    return None


def floor_ms_per_step(tflop: dict[str, float], device_name: str, fp8_linears: bool = False) -> float | None:
    """The fastest a step could be on that GPU: its FLOPs at the dense tensor-core peak.

    With `fp8_linears`, the Linear layers count at the fp8 peak and attention stays at bf16.
    """
    bf16 = peak_tflops(device_name, "bf16")
    linear_peak = peak_tflops(device_name, "fp8") if fp8_linears else bf16
    if bf16 is None or linear_peak is None:
        return None
    return (tflop["linear_tflop"] / linear_peak + tflop["attention_tflop"] / bf16) * 1e3


def amortized_s_per_image(compile_s: float, s_per_image: float, images: int) -> float:
    """Seconds per image over a run of `images`, when the first one also pays `compile_s`."""
    return compile_s / images + s_per_image


def break_even_images(compile_s: float, eager_s_per_image: float, compiled_s_per_image: float) -> float | None:
    """How many images a compiled model must make before its compile time has paid for itself."""
    saved = eager_s_per_image - compiled_s_per_image
    return compile_s / saved if saved > 0 else None


# Compiled pipeline rows measured in other chapters, shown beside this chapter's transformer-alone rows.
PIPELINE_RESULTS = ("01_bitsandbytes_compile_flux-dev-shaped", "03_torchao_compile_flux-dev-shaped",
                    "06_speed_pipeline_flux-dev-shaped")


def speed_table(results: tuple[str, ...] = SPEED_RESULTS, pipeline_results: tuple[str, ...] = PIPELINE_RESULTS):
    """Every committed ms-per-step row, with compile time, SQNR and its ratio to the compute floor.

    Rows from `pipeline_results` were timed inside a whole pipeline run (chapters 01, 03 and 06); their
    `source` says so, and their floor is that of FLUX.1-dev at the same 1024×1024 size.
    """
    rows = [{**asdict(r), "source": "transformer alone (chapter 06)"}
            for name in results for r in measure.load_rows(measure.results_dir() / f"{name}.json")]
    floor = transformer_tflop_per_step(models.meta_component("flux-dev-shaped", "transformer"))
    for name in pipeline_results:
        for row in measure.load_rows(measure.results_dir() / f"{name}.json"):
            row = asdict(row)
            row["extra"] = {**row["extra"], "floor_bf16_ms": floor_ms_per_step(floor, row["device"])}
            if not row["extra"].get("compile_error"):
                rows.append({**row, "source": f"whole pipeline (chapter {name[:2]})"})
    frame = measure.to_frame(rows)
    frame = frame[~frame["recipe"].str.startswith("vae-decode")].reset_index(drop=True)
    extra = frame["extra"]
    frame["compile_s"] = extra.map(lambda e: e.get("compile_s"))
    frame["sqnr_db"] = extra.map(lambda e: e.get("sqnr_db"))
    frame["x_bf16_floor"] = frame["ms_per_step"] / extra.map(lambda e: e.get("floor_bf16_ms"))
    frame["error"] = extra.map(lambda e: e.get("error"))
    return frame[["recipe", "source", "device", "ms_per_step", "x_bf16_floor", "compile_s", "sqnr_db",
                  "peak_gpu_mem_gib", "error"]]


# --- the runner -------------------------------------------------------------------------------


# What a kernel (on a GPU) or an operator (on a CPU) is, from its name: the first kind with a matching
# substring wins. Inductor names each Triton kernel after the operations fused into it, which may
# include an attention or a matmul it only feeds (`triton_poi_fused__scaled_mm_...` quantizes the
# activations of one), so Triton kernels are filed first: templates (`triton_tem_`) are matmuls, the
# rest fused elementwise work. Then attention, since some attention kernels have "gemm" in their names.
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


def run_speed_recipe(name: str, model: str = "flux-dev-shaped", *, height: int = 1024, width: int = 1024,
                     text_tokens: int = 512, warmup: int = 2, repeats: int = 10, reference: str | None = None,
                     device: str | None = None, seed: int = 0, profile: bool = False) -> measure.Measurement:
    """Time one speed recipe on `model`'s transformer alone: compile time, then the median forward pass.

    The transformer gets the same seeded random weights as the embedded model's folder. With
    `reference` (a .pt file), the output is compared with the one saved there (SQNR in dB); a
    bf16 eager run saves its output there when the file does not exist yet. With `profile=True`,
    `extra["profile"]` says where the time of a step goes (`profile_step`).
    """
    from diffusers.models.attention_dispatch import attention_backend

    device = device or env.default_device()
    info = env.device_info(device)
    recipe = check_speed_recipe(name, info)
    # set_attention_backend() also sets the process-wide default, which reset_attention_backend() leaves, and
    # inductor-flags and torchao's fp8 configs set inductor's: both are put back afterwards, so the next recipe
    # starts from the defaults
    with attention_backend("native"), _inductor_settings_restored():
        return _time_speed_recipe(recipe, model, info, height, width, text_tokens, warmup, repeats, reference,
                                  device, seed, profile)


# The inductor settings that torchao's recommended_inductor_config_setter() changes for good, process-wide.
_TORCHAO_INDUCTOR_SETTINGS = ("coordinate_descent_tuning", "coordinate_descent_check_all_directions",
                              "force_fuse_int_mm_with_mul", "fx_graph_cache", "triton.unique_kernel_names")


def _inductor_settings_restored():
    """A context in which a recipe may change inductor's settings; on leaving, they are what they were."""
    import torch._inductor.config as inductor_config

    keys = (*INDUCTOR_FLAGS, *_TORCHAO_INDUCTOR_SETTINGS)
    return inductor_config.patch({key: inductor_config.get_config_copy()[key] for key in keys})


def _transformer_to_time(recipe: SpeedRecipe, model: str, height: int, width: int, text_tokens: int, device: str,
                         dtype: torch.dtype, seed: int):
    """`model`'s transformer with seeded random weights, the inputs of the timed step, its TFLOP, and a function
    that calibrates static fp8 (None for other recipes) on other inputs than the timed ones, at three noise levels."""
    transformer = models.build_component(model, "transformer", device=device, dtype=dtype, seed=seed)
    inputs = measure.random_transformer_inputs(transformer.config, height, width, text_tokens, device=device,
                                               dtype=dtype, seed=seed)
    calibrate = None
    if recipe.quantization == "float8static-tensor":
        calibration = [{**measure.random_transformer_inputs(transformer.config, height, width, text_tokens,
                                                            device=device, dtype=dtype, seed=seed + 1 + i),
                        "timestep": torch.tensor([t], device=device, dtype=dtype)}
                       for i, t in enumerate(CALIBRATION_TIMESTEPS)]
        calibrate = lambda: [transformer(**c) for c in calibration]  # noqa: E731
    return transformer, inputs, transformer_tflop_per_step(transformer, height, width, text_tokens), calibrate


def _time_speed_recipe(recipe: SpeedRecipe, model: str, info: env.DeviceInfo, height: int, width: int,
                       text_tokens: int, warmup: int, repeats: int, reference: str | None, device: str,
                       seed: int, profile: bool = False) -> measure.Measurement:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # each recipe compiles from nothing, and counts only its own graphs
    counters.clear()
    dtype = env.default_dtype(info)
    transformer, inputs, tflop, calibrate = _transformer_to_time(recipe, model, height, width, text_tokens, device,
                                                                 dtype, seed)
    measure.reset_peak_gpu_memory(device)
    started = time.perf_counter()
    apply_speed_recipe(transformer, recipe, info, calibrate=calibrate)
    prepare_s = time.perf_counter() - started
    weights = measure.weights_bytes(transformer)
    with torch.no_grad():
        output, first_call_s, timing = measure.time_first_call(lambda: transformer(**inputs)[0], warmup=warmup,
                                                               repeats=repeats, device=device)
    extra: dict[str, Any] = {
        "graphs_compiled": counters["stats"]["unique_graphs"] if recipe.compile_mode else 0,
        "first_call_s": first_call_s,
        "prepare_s": prepare_s,
        "compile_s": first_call_s - timing.median_s if recipe.compile_mode else None,
        "compiled_region": recipe.compiled_region,
        "text_tokens": text_tokens,
        **tflop,
        "achieved_tflops": tflop["total_tflop"] / timing.median_s,
        "floor_bf16_ms": floor_ms_per_step(tflop, info.name),
        "floor_fp8_linears_ms": floor_ms_per_step(tflop, info.name, fp8_linears=True),
        "inductor_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
        "fa3_fwd": metadata.version("fa3-fwd") if recipe.attention in FA3_ATTENTION else None,
        "calibration": (None if calibrate is None else f"{len(CALIBRATION_TIMESTEPS)} random input sets (seeds "
                        f"{seed + 1}-{seed + len(CALIBRATION_TIMESTEPS)}) at timesteps {CALIBRATION_TIMESTEPS}"),
    }
    if recipe.cuda_graph:  # the same compiled model, launched kernel by kernel: what the graph saved
        with torch.no_grad():
            eager_launches = measure.time_callable(lambda: transformer.forward.wrapped(**inputs)[0], warmup=1,
                                                   repeats=repeats, device=device)
        extra["without_cuda_graph_ms"] = eager_launches.median_s * 1e3
    if profile:
        with torch.no_grad():
            extra["profile"] = profile_step(lambda: transformer(**inputs), device=device)
    if reference:
        output = output.float().cpu()
        if not Path(reference).exists() and recipe.name == "bf16":
            torch.save(output, reference)
        if Path(reference).exists():
            extra["sqnr_db"] = measure.sqnr_db(output, torch.load(reference))
    row = measure.new_row(
        model, recipe.name, info, height=height, width=width, steps=1, weights_bytes=weights,
        ms_per_step=timing.median_s * 1e3, ms_per_step_iqr=timing.iqr_s * 1e3, repeats=repeats,
        peak_gpu_mem_gib=measure.peak_gpu_memory_gib(device), notes=f"{model} transformer alone, {height}x{width}, "
        f"{text_tokens} text tokens, random weights; one step = one forward pass", extra=extra,
    )
    del transformer
    gc.collect()
    return row


def run_speed_pipeline(name: str, model: str = "flux-dev-shaped", *, height: int = 1024, width: int = 1024,
                       steps: int = 28, repeats: int = 3, prompt: str = PIPELINE_PROMPT, device: str | None = None,
                       seed: int = 0) -> measure.Measurement:
    """Time one speed recipe inside a whole FluxPipeline: `make_fast`, then text encoding, `steps` steps and the VAE.

    The first image pays for compiling (and recording the CUDA graph) and is timed alone as `first_image_s`;
    `repeats` more images give the median seconds per image and milliseconds per denoising step.
    """
    from diffusers.models.attention_dispatch import attention_backend

    from .recipes import load_pipeline

    device = device or env.default_device()
    info = env.device_info(device)
    recipe = check_speed_recipe(name, info)
    torch._dynamo.reset()
    with attention_backend("native"), _inductor_settings_restored():
        pipe = load_pipeline(model, "bf16", device=device)
        pipe.set_progress_bar_config(disable=True)
        call = {**models.get_model(model).call_kwargs(), "height": height, "width": width, "num_inference_steps": steps}
        measure.reset_peak_gpu_memory(device)
        make_fast(pipe, recipe, info)
        measure.synchronize(device)
        started = time.perf_counter()
        pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), **call)
        measure.synchronize(device)
        first_image_s = time.perf_counter() - started
        timing = measure.time_generation(pipe, prompt, call, seed=seed, warmup=0, repeats=repeats, device=device)
    row = measure.new_row(
        model, recipe.name, info, height=height, width=width, steps=steps, repeats=repeats,
        weights_bytes=measure.weights_bytes(pipe.transformer), ms_per_step=timing.per_step.median_s * 1e3,
        ms_per_step_iqr=timing.per_step.iqr_s * 1e3, s_per_image=timing.per_image.median_s,
        s_per_image_iqr=timing.per_image.iqr_s, peak_gpu_mem_gib=measure.peak_gpu_memory_gib(device),
        notes=f"{model} whole pipeline, {height}x{width}, {steps} steps, random weights; make_fast(pipe, recipe)",
        extra={"first_image_s": first_image_s,
               "compile_s": first_image_s - timing.per_image.median_s if recipe.compile_mode else None,
               "compiled_region": recipe.compiled_region,
               "fa3_fwd": metadata.version("fa3-fwd") if recipe.attention in FA3_ATTENTION else None,
               "calibration": (f"make_fast's default: one generation of {CALIBRATION_STEPS} steps of the "
                               f"prompt {CALIBRATION_PROMPT!r}" if recipe.quantization == "float8static-tensor"
                               else None)},
    )
    del pipe
    gc.collect()
    return row


def run_vae_decode(variant: str, model: str = "flux-dev-shaped", *, height: int = 1024, width: int = 1024,
                   warmup: int = 2, repeats: int = 10, device: str | None = None,
                   seed: int = 0) -> measure.Measurement:
    """Time one VAE decode at `height`×`width`: `vae-decode`, `+channels-last`, `+compile`."""
    parts = variant.split("+")
    if parts[0] != "vae-decode" or not set(parts[1:]) <= {"channels-last", "compile"}:
        raise ValueError(f"Unknown VAE variant {variant!r}: vae-decode[+channels-last][+compile].")
    device = device or env.default_device()
    info = env.device_info(device)
    dtype = env.default_dtype(info)
    vae = models.build_component(model, "vae", device=device, dtype=dtype, seed=seed)
    latents = torch.randn(1, vae.config.latent_channels, height // 8, width // 8,
                          generator=torch.Generator("cpu").manual_seed(seed)).to(device, dtype)
    if "channels-last" in parts:
        vae.to(memory_format=torch.channels_last)
        latents = latents.to(memory_format=torch.channels_last)
    if "compile" in parts:
        vae.decode = torch.compile(vae.decode)
    measure.reset_peak_gpu_memory(device)
    with torch.no_grad():
        _, first_call_s, timing = measure.time_first_call(lambda: vae.decode(latents), warmup=warmup, repeats=repeats,
                                                          device=device)
    return measure.new_row(
        model, variant, info, height=height, width=width, s_per_image=timing.median_s,
        s_per_image_iqr=timing.iqr_s, repeats=repeats, peak_gpu_mem_gib=measure.peak_gpu_memory_gib(device),
        notes=f"{model} VAE decode alone, {height}x{width}",
        extra={"first_call_s": first_call_s,
               "compile_s": first_call_s - timing.median_s if "compile" in parts else None},
    )


def attention_fn(kind: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """Attention over (batch, tokens, heads, head_dim) tensors with a key of ATTENTION_BACKENDS or FA3_ATTENTION."""
    if kind in FA3_ATTENTION:
        return FlashAttention3Processor(fp8=kind == "fa3-fp8").attention
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    return functools.partial(dispatch_attention_fn, backend=ATTENTION_BACKENDS[kind])


def run_attention(variant: str, *, tokens: int = 4608, heads: int = 24, head_dim: int = 128, blocks: int = 57,
                  calls: int = 10, warmup: int = 2, repeats: int = 10, device: str | None = None,
                  seed: int = 0) -> measure.Measurement:
    """Time attention alone at FLUX.1-dev's 1024×1024 shape: `attention-<kind>`, e.g. `attention-fa3-fp8`.

    One FLUX step runs `blocks` (57) attentions of `tokens` (4,096 image + 512 text) by `heads` × `head_dim`;
    `ms_per_step` is 57 of them. `extra.sqnr_db` compares the output with float32 attention on the same
    bf16 inputs (q and k RMS-normalized, as FLUX's are), `extra.tflops` is the rate achieved.
    """
    kind = variant.removeprefix("attention-")
    if not variant.startswith("attention-") or kind not in (*ATTENTION_BACKENDS, *FA3_ATTENTION):
        kinds = ",".join((*ATTENTION_BACKENDS, *FA3_ATTENTION))
        raise ValueError(f"Unknown attention variant {variant!r}: attention-{{{kinds}}}.")
    device = device or env.default_device()
    info = env.device_info(device)
    check_speed_recipe(f"bf16+attn-{kind}", info)
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
        "flux-dev-shaped", variant, info, ms_per_step=call_s * blocks * 1e3,
        ms_per_step_iqr=timing.iqr_s / calls * blocks * 1e3,
        repeats=repeats, notes=f"attention alone: batch 1, {tokens} tokens, {heads} heads of {head_dim}, {dtype}; "
        f"ms_per_step is {blocks} calls, one per FLUX block",
        extra={"attention_ms": call_s * 1e3, "tflops": tflop / call_s, "tflop_per_call": tflop,
               "sqnr_db": measure.sqnr_db(output.float(), reference), "output_dtype": str(output.dtype)},
    )


# The operators that do a step's arithmetic, as PyTorch's dispatcher names them: the matmuls (torchao's fp8
# Linears and quantlab's end in `_scaled_mm`, bf16 Linears in `mm` or `addmm`), and attention (FA3's custom op, or
# one of PyTorch's kernels, whose q, k and v are (batch, heads, tokens, head_dim)). A recorded call's own inner
# calls are not recorded again.
_MATMUL_OPS = ("_scaled_mm", "mm", "addmm", "bmm")
_ATTENTION_OPS = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
                  "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_efficient_attention")
_FA3_OPS = ("_flash_attn_forward", "fwd")  # fa3-fwd's custom op, which calls its kernel's op
COMPUTE_ONLY_PREFIX = "compute-only:"


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


def _eager_part(recipe: SpeedRecipe) -> SpeedRecipe:
    """`recipe` without what changes only how its kernels are launched or fused (compile, CUDA graph, GELU form)."""
    steps = [step for step in recipe.name.split("+")[1:]
             if not step.startswith("compile") and step not in ("cuda-graph", "inductor-flags", "gelu-sigmoid")]
    return parse_speed_recipe("+".join([recipe.name.split("+")[0], *steps]))


def run_compute_only(name: str, model: str = "flux-dev-shaped", *, height: int = 1024, width: int = 1024,
                     text_tokens: int = 512, warmup: int = 2, repeats: int = 10, device: str | None = None,
                     seed: int = 0, profile: bool = False) -> measure.Measurement:
    """Time a step's matmuls and attention alone: `compute-only:<recipe>`, e.g. `compute-only:bf16+fused-qkv`.

    The transformer gets the recipe's weights, projections, attention and kernels, and runs one step
    eagerly (compile and the CUDA graph change only how kernels launch). Its matmul and attention calls
    are recorded with their operands (`record_compute_calls`), then replayed back to back, on a GPU as
    one CUDA graph, and timed like a step: the median of `repeats` after `warmup`. This is the fastest
    the step could run at the clock its arithmetic leaves the GPU, with no elementwise work at all.
    """
    if not name.startswith(COMPUTE_ONLY_PREFIX):
        raise ValueError(f"Unknown variant {name!r}: {COMPUTE_ONLY_PREFIX}<recipe>, e.g. {COMPUTE_ONLY_PREFIX}bf16.")
    device = device or env.default_device()
    info = env.device_info(device)
    eager = _eager_part(check_speed_recipe(name.removeprefix(COMPUTE_ONLY_PREFIX), info))
    dtype = env.default_dtype(info)
    transformer, inputs, tflop, calibrate = _transformer_to_time(eager, model, height, width, text_tokens, device,
                                                                 dtype, seed)
    from diffusers.models.attention_dispatch import attention_backend

    with attention_backend("native"), torch.no_grad():
        apply_speed_recipe(transformer, eager, info, calibrate=calibrate)
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
        "recorded_from": eager.name, "text_tokens": text_tokens, "calls": len(calls),
        "calls_by_kind": {kind: sum(c.kind == kind for c in calls) for kind in by_kind},
        "recorded_tflop": by_kind, **tflop, "achieved_tflops": sum(by_kind.values()) / timing.median_s,
        "floor_bf16_ms": floor_ms_per_step(tflop, info.name),
        "floor_fp8_linears_ms": floor_ms_per_step(tflop, info.name, fp8_linears=True),
        "replayed_as": "one CUDA graph" if device.startswith("cuda") else "the calls one by one",
        "fa3_fwd": metadata.version("fa3-fwd") if eager.attention in FA3_ATTENTION else None,
    }
    if profiled:
        extra["profile"] = profiled
    row = measure.new_row(
        model, name, info, height=height, width=width, steps=1, ms_per_step=timing.median_s * 1e3,
        ms_per_step_iqr=timing.iqr_s * 1e3, repeats=repeats, peak_gpu_mem_gib=measure.peak_gpu_memory_gib(device),
        notes=f"{model} transformer alone, {height}x{width}, {text_tokens} text tokens, random weights: only the "
        "step's matmul and attention calls, replayed on the operands one step recorded", extra=extra)
    del transformer, calls
    gc.collect()
    return row


def run_matmuls(variant: str, model: str = "flux-dev-shaped", *, height: int = 1024, width: int = 1024,
                text_tokens: int = 512, calls: int = 10, warmup: int = 2, repeats: int = 10,
                device: str | None = None, seed: int = 0) -> measure.Measurement:
    """Time the matmuls of one FLUX step alone, shape by shape: `matmuls-bf16` or `matmuls-fp8`.

    Each Linear that one forward pass runs (with fused QKV projections, as every fast recipe has) becomes
    one matmul of its shape on random data with its bias: `F.linear` in bf16, and for fp8 the call
    torchao's per-tensor configs make, `torch._scaled_mm` with fast accumulation and a bf16 output. Each
    distinct shape is timed `calls` times in a row and multiplied by how often a step runs it; the sum,
    `ms_per_step`, is what the step's matmuls cost with nothing between them (`extra.shapes` has each).
    """
    dtype_name = variant.removeprefix("matmuls-")
    if not variant.startswith("matmuls-") or dtype_name not in ("bf16", "fp8"):
        raise ValueError(f"Unknown matmul variant {variant!r}: matmuls-bf16 or matmuls-fp8.")
    device = device or env.default_device()
    info = env.device_info(device)
    if dtype_name == "fp8" and not info.fp8:
        raise UnsupportedHardwareError(
            f"{variant} times float8 matmuls, which need a CUDA GPU of compute capability 8.9+ (Ada or Hopper), "
            f"and this device is {info.label}. Instead: matmuls-bf16.")
    if dtype_name == "bf16" and not info.bf16:
        raise UnsupportedHardwareError(f"{variant} times bf16 matmuls, which {info.label} does not run; the "
                                       "committed H200 rows are in results/06_speed_matmuls_flux-dev-shaped.json.")
    transformer = models.meta_component(model, "transformer")
    transformer.fuse_qkv_projections()
    counts = _linear_shapes(transformer, (height // 16) * (width // 16), text_tokens)
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
    linear_tflop = transformer_tflop_per_step(transformer, height, width, text_tokens)["linear_tflop"]
    call = "torch._scaled_mm, per-tensor scales, fast accumulation" if dtype_name == "fp8" else "F.linear"
    return measure.new_row(
        model, variant, info, height=height, width=width, ms_per_step=total_s * 1e3, repeats=repeats,
        notes=f"the matmuls of one {model} step ({height}x{width}, {text_tokens} text tokens, fused QKV) alone, "
        f"shape by shape; {call}, bf16 output with bias, random data",
        extra={"linear_tflop": linear_tflop, "achieved_tflops": linear_tflop / total_s, "shapes": shapes},
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m quantlab.speed --recipes R [R ...] --out FILE`: one row per recipe, saved as each ends."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="flux-dev-shaped")
    parser.add_argument("--recipes", nargs="+", required=True)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--reference", help="a .pt file: the bf16 eager output, saved by the first bf16 run")
    parser.add_argument("--out", required=True, help="a .json file; rows already in it are kept")
    parser.add_argument("--profile", action="store_true", help="also profile 3 steps: time by kernel kind")
    parser.add_argument("--pipeline-steps", type=int, help="time each recipe in a whole pipeline of this many steps")
    args = parser.parse_args(argv)
    out = Path(args.out)
    rows = [asdict(r) for r in measure.load_rows(out)] if out.exists() else []
    for name in args.recipes:
        print(f"{name}: starting", flush=True)
        try:
            if args.pipeline_steps:
                row = run_speed_pipeline(name, args.model, height=args.height, width=args.width,
                                         steps=args.pipeline_steps, repeats=args.repeats)
            elif name.startswith("attention-"):
                row = run_attention(name, tokens=(args.height // 16) * (args.width // 16) + 512, warmup=args.warmup,
                                    repeats=args.repeats)
            elif name.startswith("matmuls-"):
                row = run_matmuls(name, args.model, height=args.height, width=args.width, warmup=args.warmup,
                                  repeats=args.repeats)
            elif name.startswith(COMPUTE_ONLY_PREFIX):
                row = run_compute_only(name, args.model, height=args.height, width=args.width, warmup=args.warmup,
                                       repeats=args.repeats, profile=args.profile)
            elif name.startswith("vae-decode"):
                row = run_vae_decode(name, args.model, height=args.height, width=args.width, warmup=args.warmup,
                                     repeats=args.repeats)
            else:
                row = run_speed_recipe(name, args.model, height=args.height, width=args.width, warmup=args.warmup,
                                       repeats=args.repeats, reference=args.reference, profile=args.profile)
        except Exception as error:  # keep the rows already measured, and say why this one failed
            print(f"{name}: failed: {type(error).__name__}: {str(error).strip()[:400]}", flush=True)
            continue
        finally:  # run_speed_recipe resets dynamo itself, before it compiles
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        rows = [r for r in rows if r["recipe"] != name] + [asdict(row)]
        measure.save_rows(rows, out)
        extra = row.extra
        shown = {"s/image": row.s_per_image, "peak GiB": row.peak_gpu_mem_gib,
                 **{key: extra.get(key) for key in ("first_call_s", "first_image_s", "compile_s", "sqnr_db",
                                                    "without_cuda_graph_ms", "attention_ms", "tflops")}}
        print(f"{name}: {row.ms_per_step or 0:.1f} ms/step, " + ", ".join(
            f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
            for key, value in shown.items() if value is not None), flush=True)
        if "profile" in extra:
            print(f"{name}: profile, ms per step: " + ", ".join(
                f"{kind} {ms:.1f}" for kind, ms in extra["profile"]["ms_per_step_by_kind"].items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
