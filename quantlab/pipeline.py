"""Loading a recipe, and running it end to end with every measurement (chapters 02, 04, 05, 07 and 08).

`load_pipeline(model, recipe)` makes the real diffusers calls a recipe stands for: `from_single_file` for a
GGUF transformer, `FluxPipeline.from_pretrained(..., quantization_config=...)`, layerwise casting, then the
pipeline's placement (whole, offloaded, or spread over GPUs). `run_recipe` loads a recipe and measures one
row: memory after loading, peak memory, time per step and per image, and image error against a reference.
Chapters teach each call in the open first; these functions run the many recipes of a measuring loop.
"""

from __future__ import annotations

import gc
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import env, gguf, measure, models, newer, quality, speed
from .env import UnsupportedHardwareError
from .recipes import OFFLOAD_MODES, Recipe, get_recipe

__all__ = ["RecipeRun", "load_pipeline", "place_pipeline", "run_recipe"]

DEFAULT_PROMPT = "a photo of a cat sitting on a red chair in a sunny room"


def place_pipeline(pipe, device: str, offload: str | None = None):
    """Put `pipe` on `device`, whole (`offload=None`) or with one of `OFFLOAD_MODES` (chapter 05)."""
    if offload is None:
        return pipe.to(device)
    if offload not in OFFLOAD_MODES:
        raise ValueError(f"Unknown offload mode {offload!r}. Valid modes: {', '.join(OFFLOAD_MODES)}.")
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        level = "block_level" if offload == "group-block" else "leaf_level"
        extra = {"num_blocks_per_group": 1} if level == "block_level" else {}
        pipe.enable_group_offload(onload_device=torch.device(device), offload_device=torch.device("cpu"),
                                  offload_type=level, use_stream=offload.endswith("-stream"), **extra)
    return pipe


def load_pipeline(model: str | None = None, recipe: str | Recipe = "bf16", *, device: str | None = None,
                  dtype: torch.dtype | None = None, gguf_file: str | Path | None = None,
                  checkpoint: str | Path | None = None, seed: int = 0):
    """Load a `FluxPipeline` for `model` with `recipe`, placed on `device` (its speed-ups are `speed.apply_speedups`').

    A GGUF recipe reads `gguf_file`; a BFL or pre-quantized recipe (chapter 08) reads `checkpoint` (a file, or a
    saved folder). Every check (model name, recipe name, hardware, the file, gated access, network) happens before
    any weight is downloaded or loaded.
    """
    from diffusers import FluxPipeline, FluxTransformer2DModel

    spec = models.get_model(model)
    recipe = get_recipe(recipe)
    info = env.device_info(device)
    device = device or env.default_device()
    dtype = dtype or env.default_dtype(info)
    if spec.needs_gpu and info.kind != "cuda":
        raise UnsupportedHardwareError(
            f"Model {spec.name!r} needs a CUDA GPU, and this device is {info.label}. Use QUANTLAB_MODEL=tiny.")
    if recipe.low_ram is not None:
        raise ValueError(f"Recipe {recipe.name!r} is a whole script for a small GPU, not a pipeline to load here: "
                         f"read it with ql.get_recipe({recipe.name!r}).code(), or run it on a GPU.")
    if recipe.gguf_type and recipe.offload == "sequential":
        raise ValueError(
            f"Recipe {recipe.name!r}: sequential offload cannot move GGUF weights in diffusers 0.42 (accelerate "
            "re-creates each parameter without its GGUF type and fails with KeyError: None). Use group offload "
            "instead: gguf-q2_k+group-leaf-stream-offload+vae-tiling, or gguf-q2_k+model-offload.")
    recipe.check(info, dtype)
    if recipe.gguf_type and gguf_file is None:
        raise ValueError(f"Recipe {recipe.name!r} loads a GGUF file: pass gguf_file=<path to a {recipe.gguf_type} "
                         ".gguf>. Chapter 02 writes one from any FluxTransformer2DModel.")
    if recipe.gguf_type:
        gguf_info = gguf.inspect_gguf(gguf_file)  # missing, truncated or corrupt: fail before any loading
    if recipe.checkpoint and checkpoint is None:
        raise ValueError(f"Recipe {recipe.name!r} reads a pre-quantized checkpoint: pass checkpoint=<its "
                         f"{'file' if recipe.checkpoint == 'bfl' else 'folder'}>. Chapter 08 writes one.")
    if recipe.checkpoint == "bfl":
        newer.check_bfl_file(checkpoint)  # truncated, or without its scales: refused before loading
    elif recipe.checkpoint:
        newer.check_prequantized(checkpoint)  # the package that loads it: named before loading
    path = models.model_path(spec.name, seed=seed)

    load_kwargs = {}
    if recipe.gguf_type:
        gguf.check_architecture(gguf_info, Path(path) / "transformer")  # the header read above, not the file again
        quantized_types = set(gguf_info.tensors_per_type) - {"F32", "F16"}  # 1-D and edge tensors stay in float
        if quantized_types - {recipe.gguf_type} or (recipe.gguf_type not in gguf_info.tensors_per_type):
            raise ValueError(f"Recipe {recipe.name!r} wants a {recipe.gguf_type} file, but {gguf_file} holds "
                             f"{gguf_info.tensors_per_type}. Pass the {recipe.gguf_type} file or pick its recipe.")
        load_kwargs["transformer"] = FluxTransformer2DModel.from_single_file(
            str(gguf_file), quantization_config=recipe.gguf_config(dtype), config=path, subfolder="transformer",
            dtype=dtype)
    if recipe.checkpoint == "bfl":
        load_kwargs["transformer"] = FluxTransformer2DModel.from_single_file(
            str(checkpoint), quantization_config=recipe.transformer(dtype), config=path, subfolder="transformer",
            dtype=dtype)
    elif recipe.checkpoint:
        load_kwargs["transformer"] = FluxTransformer2DModel.from_pretrained(checkpoint, subfolder="transformer",
                                                                           dtype=dtype)
    placed_while_loading = recipe.device_map is not None or (
        recipe.backend == "torchao" and recipe.offload is None and info.kind == "cuda")
    if recipe.device_map is not None:
        load_kwargs["device_map"] = recipe.device_map
    elif placed_while_loading:
        # torchao quantizes each weight where it is loaded, and without a device map that is the CPU:
        # for the 12B transformer, over six minutes of a GPU run went by there without finishing
        load_kwargs["device_map"] = torch.device(device).type
    pipe = FluxPipeline.from_pretrained(path, quantization_config=recipe.quantization_config(dtype), dtype=dtype,
                                        **load_kwargs)
    if recipe.layerwise_storage_dtype is not None:
        pipe.transformer.enable_layerwise_casting(storage_dtype=recipe.layerwise_storage_dtype, compute_dtype=dtype)
    if recipe.vae_tiling:
        pipe.vae.enable_tiling()
    return pipe if placed_while_loading else place_pipeline(pipe, device, recipe.offload)


@dataclass
class RecipeRun:
    """What `run_recipe` returns: the measurement row, the timed images, and the pipeline if it was kept.
    Chapters 02, 07, 08."""

    row: measure.Measurement
    images: list
    pipe: Any = None
    accuracy: quality.PromptAccuracy | None = None  # the shape pictures, when prompt accuracy was measured

    @property
    def image(self):
        """The last timed image."""
        return self.images[-1]


def run_recipe(model: str | None = None, recipe: str | Recipe = "bf16", *, prompt: str | list[str] = DEFAULT_PROMPT,
               height: int | None = None, width: int | None = None, steps: int | None = None, seed: int = 0,
               warmup: int = 1, warmup_steps: int | None = None, repeats: int = 3, reference_image=None,
               device: str | None = None, keep_pipeline: bool = False, accuracy_captions: int = 0,
               notes: str = "", calibrate=None, hand_written=None, progress: bool = False, on_eager_row=None,
               **load_kwargs) -> RecipeRun:
    """Load `model` with `recipe`, apply its speed-ups, then measure memory, peak memory, time and image error.

    With a list of prompts, timed image i uses prompt i (cycling), as `measure.time_generation` does, and the
    warm-up runs use the first; `reference_image` may be a list too, one per timed image: the row's PSNR is then
    that of the pooled error and its SSIM the mean over the pairs. The warm-up images use `warmup_steps`
    denoising steps (default: `steps`); the timed ones use `steps`.

    A recipe that compiles is timed eagerly first; the row's times are the compiled ones, and `extra` holds the
    eager times, the compile time (the first compiled image less a compiled image) and how far the compiled
    transformer's output is from the eager one (`quality.compare_compiled`): a disagreement is flagged in
    `extra["compile_disagrees"]` and in the notes. `on_eager_row(row)`, if given, receives the eager row before
    compiling starts, so that a run cut off while compiling keeps it; a compile that fails leaves the eager row
    with `extra["compile_error"]`. With `accuracy_captions=n` the row's `prompt_accuracy` is measured on `n` of
    the mini model's held-out shape captions. A NaN or infinite output raises `quality.NonFiniteError`.
    `hand_written` carries the lab's hand-written steps (`quantlab.lab.hand_written.HAND_WRITTEN`) for recipes
    that have them. `progress=True` prints a line to stderr as each stage ends (the lab's long GPU runs).
    Chapters 02, 07, 08.
    """
    say = _progress if progress else (lambda message: None)
    spec = models.get_model(model)
    recipe = get_recipe(recipe)
    device = device or env.default_device()
    first_prompt = prompt if isinstance(prompt, str) else prompt[0]
    call = spec.call_kwargs()
    call.update({k: v for k, v in {"height": height, "width": width, "num_inference_steps": steps}.items() if v})

    measure.reset_peak_gpu_memory(device)
    started = time.perf_counter()
    with measure.track_peak_host_rss() as host:
        pipe = load_pipeline(spec.name, recipe, device=device, seed=seed, **load_kwargs)
    say(f"{recipe.name}: loaded in {time.perf_counter() - started:.0f} s")
    pipe.set_progress_bar_config(disable=True)  # a measuring loop wants one line per recipe
    compiles = recipe.speedups.compile is not None
    eager = recipe.speedups if not compiles else speed.without_compile(recipe.speedups)
    if eager.any:
        speed.apply_speedups(pipe, eager, calibrate=calibrate, hand_written=hand_written)
    mem_after_load = measure.memory_after_load_gib(pipe, device)
    mem_after_load_per_gpu = ([torch.cuda.memory_allocated(i) / env.GIB for i in range(torch.cuda.device_count())]
                              if device.startswith("cuda") else [])
    reserved_during_load = measure.peak_gpu_memory_gib(device)
    weights = sum(measure.component_weights_bytes(pipe).values())

    with measure.track_peak_host_rss() as host_generating:
        with quality.finite_outputs(pipe):
            warm_call = {**call, "num_inference_steps": warmup_steps or call["num_inference_steps"]}
            for _ in range(warmup):
                pipe(first_prompt, generator=torch.Generator("cpu").manual_seed(seed), **warm_call)
        say(f"{recipe.name}: warmed up")
        measure.reset_peak_gpu_memory(device)
        timing = measure.time_generation(pipe, prompt, call, seed=seed, warmup=0, repeats=repeats, device=device)
    say(f"{recipe.name}: timed {repeats} images")
    row = measure.new_row(
        spec.name, recipe.name, device, height=call["height"], width=call["width"],
        steps=call["num_inference_steps"], mem_after_load_gib=mem_after_load,
        peak_gpu_mem_gib=measure.peak_gpu_memory_gib(device), peak_host_rss_gib=host.gib, weights_bytes=weights,
        repeats=repeats, notes=notes, **_timing_fields(timing),
        extra={"peak_gpu_reserved_during_load_gib": reserved_during_load,
               "peak_gpu_allocated_gib": measure.peak_gpu_memory_gib(device, reserved=False),
               "peak_host_rss_method": host.method, "peak_host_rss_generating_gib": host_generating.gib},
    )
    per_gpu = measure.peak_gpu_memory_per_device_gib(device)
    if per_gpu is not None and len(per_gpu) > 1:
        # a pipeline spread over several GPUs: the row's peak is the fullest GPU's (what must fit on each
        # card), its memory after loading the sum over the GPUs, and extra keeps each GPU's figures
        row.peak_gpu_mem_gib = max(per_gpu)
        row.mem_after_load_gib = sum(mem_after_load_per_gpu)
        row.extra.update(peak_gpu_mem_per_device_gib=per_gpu, mem_after_load_per_device_gib=mem_after_load_per_gpu,
                         device_count=len(per_gpu))
    device_map = getattr(pipe, "hf_device_map", None)  # where device_map= put each component
    if isinstance(device_map, dict):  # "balanced" gives a dict; a plain device_map="cuda" stays a string
        row.extra["hf_device_map"] = {name: str(where) for name, where in device_map.items()}
    elif device_map:
        row.extra["hf_device_map"] = str(device_map)
    if compiles:
        if on_eager_row is not None:
            on_eager_row(row)
        try:
            timing = _compile_and_time(pipe, recipe, prompt, call, seed, repeats, device, row, say, hand_written)
        except Exception as error:  # a backend that cannot be compiled here: the row keeps the eager figures
            row.extra["compile_error"] = f"{type(error).__name__}: {error}"[:1000]
    if reference_image is not None:
        references = reference_image if isinstance(reference_image, list) else [reference_image] * len(timing.images)
        pairs = list(zip(timing.images, references))
        # PSNR of the pooled squared error (images side by side), so one identical pair cannot make it inf
        row.psnr_db = quality.psnr_db(np.concatenate([np.asarray(i) for i, _ in pairs], axis=1),
                                      np.concatenate([np.asarray(r) for _, r in pairs], axis=1))
        row.ssim = float(np.mean([quality.ssim(image, ref) for image, ref in pairs]))
    accuracy = quality.prompt_accuracy(pipe, call, accuracy_captions, seed=seed) if accuracy_captions else None
    if accuracy is not None:
        row.prompt_accuracy = accuracy.accuracy
    if not keep_pipeline:
        del pipe
        pipe = None
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return RecipeRun(row, timing.images, pipe, accuracy)


def _timing_fields(timing: measure.GenerationTiming) -> dict[str, float]:
    """The time fields of a `Measurement`, from one `time_generation` result."""
    return {"ms_per_step": timing.per_step.median_s * 1000, "ms_per_step_iqr": timing.per_step.iqr_s * 1000,
            "s_per_image": timing.per_image.median_s, "s_per_image_iqr": timing.per_image.iqr_s}


def _progress(message: str) -> None:
    # a long GPU run should say where it is, so that a run cut off by a time limit still tells
    print(f"  [{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _compile_and_time(pipe, recipe: Recipe, prompt, call, seed, repeats, device, row, say,
                      hand_written) -> measure.GenerationTiming:
    """Compile `pipe`'s transformer as `recipe` says, check it against eager, and time it; the eager figures go to
    `row.extra`. Returns the compiled timing."""
    first_prompt = prompt if isinstance(prompt, str) else prompt[0]
    steps = recipe.speedups
    row.extra.update(eager_ms_per_step=row.ms_per_step, eager_s_per_image=row.s_per_image,
                     fullgraph=steps.fullgraph, compiled_region=steps.compiled_region)
    inputs = quality.capture_transformer_inputs(pipe, first_prompt, call, seed=seed)
    with torch.no_grad():
        eager_output = pipe.transformer(**inputs)[0].float().cpu()
    speed.apply_speedups(pipe, speed.only_compile(steps), hand_written=hand_written)
    measure.synchronize(device)
    start = time.perf_counter()
    with quality.finite_outputs(pipe):
        pipe(first_prompt, generator=torch.Generator("cpu").manual_seed(seed), **call)
    measure.synchronize(device)
    first_image_s = time.perf_counter() - start
    say(f"{recipe.name}: compiled and ran the first image in {first_image_s:.0f} s")
    timing = measure.time_generation(pipe, prompt, call, seed=seed, warmup=0, repeats=repeats, device=device)
    with torch.no_grad():
        check = quality.compare_compiled(pipe.transformer(**inputs)[0].float().cpu(), eager_output)
    for name, value in _timing_fields(timing).items():
        setattr(row, name, value)
    row.extra.update(first_compiled_image_s=first_image_s, compile_s=first_image_s - timing.per_image.median_s,
                     compiled_vs_eager_sqnr_db=check.sqnr_db, compile_disagrees=not check.agrees)
    if not check.agrees:
        row.notes = "; ".join(filter(None, [row.notes, check.message]))
    return timing
