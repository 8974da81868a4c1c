"""Speed: what makes one FLUX transformer step fast, measured against the compute floor (chapter 06).

`apply_speedups` runs a recipe's `Speedups` on a loaded pipeline (or a bare transformer) with the real
diffusers, torchao and torch calls, straight-line, one `if` per step, in the order the steps must go:
fused QKV projections, the attention backend, quantized activations (static fp8 calibrates first), the
inductor flags, `torch.compile` of the repeated blocks or of the whole transformer, a CUDA graph around
the forward pass, `channels_last` for the VAE. The hand-written steps (FlashAttention-3, the GELU as a
sigmoid, the Triton kernels) come from the lab (`quantlab.lab.hand_written`), which passes them in as
`hand_written`. `transformer_tflop_per_step` and `floor_ms_per_step` give the floor a step cannot beat,
and `speed_table` every committed row beside it.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import asdict
from typing import Any, Callable, Protocol

import torch

from . import env, measure, models
from .recipes import ATTENTION_BACKENDS, FA3_ATTENTION, Recipe, Speedups

__all__ = [
    "CALIBRATION_PROMPT",
    "CudaGraphForward",
    "HandWritten",
    "INDUCTOR_FLAGS",
    "PIPELINE_RESULTS",
    "SPEED_RESULTS",
    "amortized_s_per_image",
    "apply_speedups",
    "break_even_images",
    "floor_ms_per_step",
    "linear_shapes",
    "only_compile",
    "speed_table",
    "transformer_tflop_per_step",
    "unused_projections",
    "without_compile",
]

# The inductor settings of the PyTorch team's flux-fast recipe: tune each generated kernel's launch
# configuration by coordinate descent (slower compiles), and leave matmul epilogues to cuBLAS.
INDUCTOR_FLAGS = {
    "conv_1x1_as_mm": True,
    "epilogue_fusion": False,
    "coordinate_descent_tuning": True,
    "coordinate_descent_check_all_directions": True,
}

# What static fp8 observes when `apply_speedups` is given a whole pipeline and no `calibrate`: one short
# generation, so that the observers see the activations of several denoising steps.
CALIBRATION_PROMPT = "a photo of a cat sitting on a red chair in a sunny room"
CALIBRATION_STEPS = 4


class HandWritten(Protocol):
    """The lab's hand-written steps (`quantlab.lab.hand_written.HAND_WRITTEN`), called by `apply_speedups` in order.
    Chapters 02, 07, 08."""

    def check(self, transformer: torch.nn.Module, steps: Speedups) -> None: ...  # refusals, before anything changes

    def attention_processor(self, steps: Speedups) -> Any: ...  # FlashAttention-3, for attn-fa3 and attn-fa3-fp8

    def before_quantizing(self, transformer: torch.nn.Module, steps: Speedups) -> None: ...  # gelu-sigmoid

    def after_quantizing(self, transformer: torch.nn.Module, steps: Speedups) -> None: ...  # the Triton kernels


def without_compile(steps: Speedups) -> Speedups:
    """`steps` without what compiles or records (compile, inductor flags, CUDA graph): the eager part.
    Chapters 02, 07, 08."""
    return dataclasses.replace(steps, compile=None, compile_mode="default", inductor_flags=False, cuda_graph=False,
                               gelu_sigmoid=False)


def only_compile(steps: Speedups) -> Speedups:
    """The compiling part of `steps`, to apply after `without_compile(steps)` ran. Chapters 02, 07, 08."""
    return Speedups(compile=steps.compile, compile_mode=steps.compile_mode, fullgraph=steps.fullgraph,
                    inductor_flags=steps.inductor_flags, cuda_graph=steps.cuda_graph, gelu_sigmoid=steps.gelu_sigmoid)


def _torchao_config(activations: str, step: str | None = None):
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Float8StaticActivationFloat8WeightConfig,
        Int8DynamicActivationInt8WeightConfig,
        PerRow,
        PerTensor,
    )

    if activations == "int8dq":
        return Int8DynamicActivationInt8WeightConfig()
    if activations == "float8static-tensor":
        return Float8StaticActivationFloat8WeightConfig(step=step)
    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow() if activations == "float8dq-row"
                                                     else PerTensor())


def unused_projections(transformer: torch.nn.Module) -> set[str]:
    """The separate q, k, v projections that fuse_qkv_projections() keeps beside the fused one, unused.
    Chapters 02, 06, 07, 08."""
    return {f"{name}.{projection}" for name, m in transformer.named_modules() if getattr(m, "fused_projections", False)
            for projection in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")}


def apply_speedups(pipe, steps: Speedups | Recipe, *, device: env.DeviceInfo | None = None,
                   calibrate: Callable[[], Any] | None = None, hand_written: HandWritten | None = None):
    """Apply `steps` (or a recipe's speed-ups) to a FluxPipeline, or to a bare FluxTransformer2DModel, in place.

    The hardware checks come first, so steps this device cannot run change nothing. Static fp8
    (`float8static-tensor`) runs `calibrate()` between torchao's prepare and convert steps, so that each
    Linear's observer sees representative activations; for a pipeline it defaults to one generation of
    `CALIBRATION_STEPS` steps, and a bare transformer needs one. Chapters 02, 07, 08.
    """
    name = steps.name if isinstance(steps, Recipe) else "these speed-ups"
    steps = steps.speedups if isinstance(steps, Recipe) else steps
    transformer = getattr(pipe, "transformer", pipe)
    device = device or env.device_info(next(transformer.parameters()).device.type)
    if steps.hand_written and hand_written is None:
        raise ValueError(f"{name!r} has hand-written steps (FlashAttention-3, the GELU as a sigmoid, Triton kernels), "
                         "which the lab applies: python -m quantlab.lab.speed, or pass "
                         "hand_written=quantlab.lab.hand_written.HAND_WRITTEN.")
    env.check_hardware(name, steps.needs(), device)
    if steps.vae_channels_last and not hasattr(pipe, "vae"):
        raise ValueError(f"{name!r} changes the VAE; pass the whole pipeline, not a transformer.")
    static = steps.activations == "float8static-tensor"
    if static and calibrate is None:
        if transformer is pipe:
            raise ValueError(f"{name!r} observes each activation's range before it quantizes: pass calibrate=, a "
                             "function that runs the transformer on representative inputs.")
        calibrate = functools.partial(pipe, CALIBRATION_PROMPT, num_inference_steps=CALIBRATION_STEPS,
                                      output_type="latent")
    if hand_written is not None:  # the hand-written steps' own refusals (a transformer not in bf16), likewise first
        hand_written.check(transformer, steps)
    if steps.fuse_qkv:  # before quantizing, so that the fused Linear is the one quantized
        transformer.fuse_qkv_projections()
    if steps.attention in FA3_ATTENTION:  # before calibrating, so that the observers see what will run
        transformer.set_attn_processor(hand_written.attention_processor(steps))
    elif steps.attention:
        transformer.set_attention_backend(ATTENTION_BACKENDS[steps.attention])
    if hand_written is not None:
        hand_written.before_quantizing(transformer, steps)
    if steps.activations:
        from torchao.quantization import quantize_

        if static:  # observers on every Linear that runs, one pass over the calibration inputs, then fp8
            unused = unused_projections(transformer)  # an observer that never saw an input has no range
            used = lambda module, fqn: isinstance(module, torch.nn.Linear) and fqn not in unused  # noqa: E731
            quantize_(transformer, _torchao_config(steps.activations, step="prepare"), filter_fn=used)
            with torch.no_grad():
                calibrate()
            quantize_(transformer, _torchao_config(steps.activations, step="convert"),
                      filter_fn=lambda module, fqn: hasattr(module, "input_act_obs"))  # the observed ones
        else:
            quantize_(transformer, _torchao_config(steps.activations))
    if hand_written is not None:  # after quantizing: the kernels quantize with the scales calibration found
        hand_written.after_quantizing(transformer, steps)
    if steps.inductor_flags:  # process-wide, like the flags in flux-fast; the lab's runner puts them back
        import torch._inductor.config as inductor_config

        for flag, value in INDUCTOR_FLAGS.items():
            setattr(inductor_config, flag, value)
    if steps.compile:
        # bitsandbytes' 8-bit matmul returns a data-dependent number of outlier columns
        torch._dynamo.config.capture_dynamic_output_shape_ops = True
        options = {"fullgraph": steps.fullgraph, "mode": None if steps.compile_mode == "default" else steps.compile_mode}
        if steps.compile == "regional":
            transformer.compile_repeated_blocks(**options)
        else:
            transformer.compile(**options)
    if steps.cuda_graph:
        transformer.forward = CudaGraphForward(transformer.forward)
    if steps.vae_channels_last:
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
    Install it with `transformer.forward = CudaGraphForward(transformer.forward)`. Chapters 02, 06, 07, 08.
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


def linear_shapes(transformer: torch.nn.Module, image_tokens: int,
                  text_tokens: int) -> dict[tuple[int, int, int], int]:
    """How often one forward pass runs each Linear shape: {(token rows, in_features, out_features): count}.

    Every Linear that runs counts, on the tokens it sees; the unfused projections that
    fuse_qkv_projections() keeps beside the fused ones do not run. Chapter 06.
    """
    unused = unused_projections(transformer)
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
    leaves out elementwise work, which is memory-bound rather than compute-bound. Chapter 06.
    """
    image_tokens = (height // 16) * (width // 16)
    linear = sum(2 * rows * inputs * outputs * count
                 for (rows, inputs, outputs), count in linear_shapes(transformer, image_tokens, text_tokens).items())
    config = transformer.config
    inner = config.num_attention_heads * config.attention_head_dim
    blocks = config.num_layers + config.num_single_layers
    attention = blocks * 2 * 2 * (image_tokens + text_tokens) ** 2 * inner  # Q·Kᵀ and P·V
    return {"linear_tflop": linear / 1e12, "attention_tflop": attention / 1e12,
            "total_tflop": (linear + attention) / 1e12}


def floor_ms_per_step(tflop: dict[str, float], device_name: str, fp8_linears: bool = False) -> float | None:
    """The fastest a step could be on that GPU: its FLOPs at the dense tensor-core peak.

    With `fp8_linears`, the Linear layers count at the fp8 peak and attention stays at bf16. Chapter 06.
    """
    bf16 = env.peak_tflops(device_name, "bf16")
    linear_peak = env.peak_tflops(device_name, "fp8") if fp8_linears else bf16
    if bf16 is None or linear_peak is None:
        return None
    return (tflop["linear_tflop"] / linear_peak + tflop["attention_tflop"] / bf16) * 1e3


def amortized_s_per_image(compile_s: float, s_per_image: float, images: int) -> float:
    """Seconds per image over a run of `images`, when the first one also pays `compile_s`. Chapter 06."""
    return compile_s / images + s_per_image


def break_even_images(compile_s: float, eager_s_per_image: float, compiled_s_per_image: float) -> float | None:
    """How many images a compiled model must make before its compile time has paid for itself. Chapter 06."""
    saved = eager_s_per_image - compiled_s_per_image
    return compile_s / saved if saved > 0 else None


# --- the committed rows -----------------------------------------------------------------------

# The committed transformer-alone runs of this chapter: an H100's, and an H200's (the same compute, faster memory).
SPEED_RESULTS = ("06_speed_flux-dev-shaped", "06_speed_h200_flux-dev-shaped")
# Compiled pipeline rows measured in other chapters, shown beside this chapter's transformer-alone rows.
PIPELINE_RESULTS = ("01_bitsandbytes_compile_flux-dev-shaped", "03_torchao_compile_flux-dev-shaped",
                    "06_speed_pipeline_flux-dev-shaped", "08_newer_flux-dev-shaped")


def speed_table(results: tuple[str, ...] = SPEED_RESULTS, pipeline_results: tuple[str, ...] = PIPELINE_RESULTS):
    """Every committed ms-per-step row, with compile time, SQNR and its ratio to the compute floor.

    Rows from `pipeline_results` were timed inside a whole pipeline run (chapters 01, 03, 06 and 08); their
    `source` says so, and their floor is that of FLUX.1-dev at the same 1024×1024 size. A file not committed
    yet is left out.
    """
    rows = [{**asdict(r), "source": "transformer alone (chapter 06)"}
            for name in results for r in measure.load_rows(measure.results_dir() / f"{name}.json")]
    floor = transformer_tflop_per_step(models.meta_component("flux-dev-shaped", "transformer"))
    for name in pipeline_results:
        path = measure.results_dir() / f"{name}.json"
        for row in measure.load_rows(path) if path.exists() else []:
            row = asdict(row)
            row["extra"] = {**row["extra"], "floor_bf16_ms": floor_ms_per_step(floor, row["device"])}
            if not row["extra"].get("compile_error") and row.get("ms_per_step"):
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
