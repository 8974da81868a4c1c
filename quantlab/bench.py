"""Benchmark recipes end to end: load, measure memory, generate, time, and compare with a reference.

Notebooks call `run_recipe` for one recipe. On a GPU machine the command line runs a list of
recipes and writes the rows to `results/`:

    python -m quantlab.bench --model flux-dev-shaped --recipes bf16 bnb-8bit --out results/NAME.json
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import env, measure, models, recipes
from . import gguf as ql_gguf

__all__ = ["RecipeRun", "run_recipe", "run_recipes", "write_gguf_file", "main"]

DEFAULT_PROMPT = "a photo of a cat sitting on a red chair in a sunny room"


@dataclass
class RecipeRun:
    """What `run_recipe` returns: the measurement row, the timed images, and the pipeline if it was kept."""

    row: measure.Measurement
    images: list
    pipe: Any = None
    accuracy: measure.PromptAccuracy | None = None  # the shape pictures, when prompt accuracy was measured

    @property
    def image(self):
        """The last timed image."""
        return self.images[-1]


def run_recipe(model: str | None = None, recipe: str = "bf16", *, prompt: str | list[str] = DEFAULT_PROMPT,
               height: int | None = None, width: int | None = None, steps: int | None = None, seed: int = 0,
               warmup: int = 1, warmup_steps: int | None = None, repeats: int = 3, reference_image=None,
               device: str | None = None, keep_pipeline: bool = False, compile: bool = False,
               fullgraph: bool = False, regional: bool = False, eager_row_out: str | None = None,
               accuracy_captions: int = 0, notes: str = "", **load_kwargs) -> RecipeRun:
    """Load `model` with `recipe`, then measure memory after loading, peak memory, time and image error.

    With a list of prompts, timed image i uses prompt i (cycling), as `measure.time_generation` does, and
    the warm-up and compile runs use the first; `reference_image` may be a list too, one per timed image:
    the row's PSNR is then that of the pooled error and its SSIM the mean over the pairs.

    The warm-up images use `warmup_steps` denoising steps (default: `steps`); the timed ones use `steps`.
    With `compile=True` the transformer is then compiled (`transformer.compile(fullgraph=...)`, or with
    `regional=True` only its repeated blocks, `transformer.compile_repeated_blocks(...)`) and timed
    again: the row's times are the compiled ones, and `extra` holds the eager times and the compile
    time (the first compiled image minus a compiled image). `eager_row_out`, if given, receives the
    eager row before compiling starts, so a run cut off while compiling keeps it; it is removed once
    the compiled row exists. With `accuracy_captions=n` the row's `prompt_accuracy` is measured on `n` of
    the mini model's held-out shape captions (`measure.prompt_accuracy`), after the timed images.
    """
    spec = models.get_model(model)
    device = device or env.default_device()
    first_prompt = prompt if isinstance(prompt, str) else prompt[0]
    call = spec.call_kwargs()
    call.update({k: v for k, v in {"height": height, "width": width, "num_inference_steps": steps}.items() if v})

    measure.reset_peak_gpu_memory(device)
    started = time.perf_counter()
    with measure.track_peak_host_rss() as host:
        pipe = recipes.load_pipeline(spec.name, recipe, device=device, seed=seed, **load_kwargs)
    _progress(f"{recipe}: loaded in {time.perf_counter() - started:.0f} s")
    pipe.set_progress_bar_config(disable=True)  # a benchmark log wants one line per recipe
    mem_after_load = measure.memory_after_load_gib(pipe, device)
    mem_after_load_per_gpu = ([torch.cuda.memory_allocated(i) / measure.GIB for i in range(torch.cuda.device_count())]
                              if device.startswith("cuda") else [])
    reserved_during_load = measure.peak_gpu_memory_gib(device)
    weights = sum(measure.component_weights_bytes(pipe).values())

    with measure.track_peak_host_rss() as host_generating:
        if warmup:
            warm_call = {**call, "num_inference_steps": warmup_steps or call["num_inference_steps"]}
            for _ in range(warmup):
                pipe(first_prompt, generator=torch.Generator("cpu").manual_seed(seed), **warm_call)
        _progress(f"{recipe}: warmed up")
        measure.reset_peak_gpu_memory(device)
        timing = measure.time_generation(pipe, prompt, call, seed=seed, warmup=0, repeats=repeats, device=device)
    _progress(f"{recipe}: timed {repeats} images")
    row = measure.new_row(
        spec.name,
        recipes.get_recipe(recipe).name,
        device,
        height=call["height"],
        width=call["width"],
        steps=call["num_inference_steps"],
        mem_after_load_gib=mem_after_load,
        peak_gpu_mem_gib=measure.peak_gpu_memory_gib(device),
        peak_host_rss_gib=host.gib,
        weights_bytes=weights,
        repeats=repeats,
        notes=notes,
        **_timing_fields(timing),
        extra={
            "peak_gpu_reserved_during_load_gib": reserved_during_load,
            "peak_gpu_allocated_gib": measure.peak_gpu_memory_gib(device, reserved=False),
            "peak_host_rss_method": host.method,
            "peak_host_rss_generating_gib": host_generating.gib,
        },
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
    if compile:
        _compile_and_time(pipe, prompt, call, seed, repeats, device, fullgraph, regional, row,
                          eager_row_out=eager_row_out)
    if reference_image is not None:
        references = reference_image if isinstance(reference_image, list) else [reference_image] * len(timing.images)
        pairs = list(zip(timing.images, references))
        # PSNR of the pooled squared error (images side by side), so one identical pair cannot make it inf
        row.psnr_db = measure.psnr_db(np.concatenate([np.asarray(i) for i, _ in pairs], axis=1),
                                      np.concatenate([np.asarray(r) for _, r in pairs], axis=1))
        row.ssim = float(np.mean([measure.ssim(image, ref) for image, ref in pairs]))
    accuracy = measure.prompt_accuracy(pipe, call, accuracy_captions, seed=seed) if accuracy_captions else None
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
    return {
        "ms_per_step": timing.per_step.median_s * 1000,
        "ms_per_step_iqr": timing.per_step.iqr_s * 1000,
        "s_per_image": timing.per_image.median_s,
        "s_per_image_iqr": timing.per_image.iqr_s,
    }


def _progress(message: str) -> None:
    # a long GPU run should say where it is, so that a run cut off by a time limit still tells
    print(f"  [{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _compile_and_time(pipe, prompt, call, seed, repeats, device, fullgraph, regional, row,
                      eager_row_out: str | None = None) -> None:
    row.extra.update(eager_ms_per_step=row.ms_per_step, eager_s_per_image=row.s_per_image, fullgraph=fullgraph,
                     compiled_region=None)
    if eager_row_out:
        measure.save_rows([row], eager_row_out)
    # bitsandbytes' 8-bit matmul returns a data-dependent number of outlier columns
    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    try:
        if regional:
            pipe.transformer.compile_repeated_blocks(fullgraph=fullgraph)
        else:
            pipe.transformer.compile(fullgraph=fullgraph)
        measure.synchronize(device)
        start = time.perf_counter()
        first_prompt = prompt if isinstance(prompt, str) else prompt[0]
        pipe(first_prompt, generator=torch.Generator("cpu").manual_seed(seed), **call)
        measure.synchronize(device)
        first_image_s = time.perf_counter() - start
        _progress(f"{row.recipe}: compiled and ran the first image in {first_image_s:.0f} s")
        timing = measure.time_generation(pipe, prompt, call, seed=seed, warmup=0, repeats=repeats, device=device)
    except Exception as error:  # a backend that cannot be compiled here: record why, keep the eager row
        row.extra["compile_error"] = f"{type(error).__name__}: {error}"[:1000]
        return
    row.recipe = f"{row.recipe}+compile"
    row.extra["compiled_region"] = "repeated blocks" if regional else "whole transformer"
    for name, value in _timing_fields(timing).items():
        setattr(row, name, value)
    row.extra.update(first_compiled_image_s=first_image_s, compile_s=first_image_s - timing.per_image.median_s)
    if eager_row_out:
        Path(eager_row_out).unlink(missing_ok=True)  # the compiled row supersedes it


def run_recipes(model: str | None, recipe_names: list[str], gguf_files: dict | None = None,
                **kwargs) -> list[RecipeRun]:
    """`run_recipe` for each recipe in turn; the first one's image is the reference for the rest.

    `gguf_files` maps each gguf-* recipe to its file, with the `GGUFWriteReport` that wrote it if any.
    """
    runs: list[RecipeRun] = []
    for name in recipe_names:
        reference = runs[0].images if runs else None
        gguf_file, write_report = (gguf_files or {}).get(name, (None, None))
        extra_load = {"gguf_file": gguf_file} if gguf_file else {}
        run = run_recipe(model, name, reference_image=reference, **extra_load, **kwargs)
        if gguf_file:
            run.row.extra["gguf_file_bytes"] = Path(gguf_file).stat().st_size
            if write_report is not None:
                run.row.extra.update(gguf_write_s=write_report.seconds,
                                     gguf_write_params_per_s=write_report.params_per_s)
        print(_describe(run.row), flush=True)
        runs.append(run)
    return runs


def write_gguf_file(model: str | None, gguf_type: str, folder: str) -> tuple[Path, Any]:
    """The GGUF file of `model`'s transformer in `gguf_type` under `folder`, written first if missing.

    Returns the path and the `GGUFWriteReport` (None when the file was already there).
    """
    from diffusers import FluxTransformer2DModel

    spec = models.get_model(model)
    path = Path(folder) / f"{spec.name.replace('/', '--')}-{gguf_type}.gguf"
    if path.is_file():
        return path, None
    device = env.default_device()
    transformer = FluxTransformer2DModel.from_pretrained(
        models.model_path(spec.name), subfolder="transformer", torch_dtype=env.default_dtype(env.device_info(device))
    ).to(device)
    report = ql_gguf.write_gguf(transformer, path, gguf_type)
    _progress(f"wrote {path.name}: {report.file_bytes / 2**30:.2f} GiB in {report.seconds:.0f} s, "
              f"{report.params_per_s / 1e6:.0f} M params/s")
    del transformer
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return path, report


def _describe(row: measure.Measurement) -> str:
    def fmt(value, spec):
        return "n/a" if value is None else format(value, spec)

    return (f"{row.recipe:<28} after load {fmt(row.mem_after_load_gib, '.3f')} GiB, "
            f"peak {fmt(row.peak_gpu_mem_gib, '.3f')} GiB, host RSS {fmt(row.peak_host_rss_gib, '.2f')} GiB, "
            f"{fmt(row.ms_per_step, '.1f')} ms/step, {fmt(row.s_per_image, '.2f')} s/image, "
            f"PSNR {fmt(row.psnr_db, '.1f')} dB")


def _eager_rows_path(out: str) -> str:
    """Where the command line keeps a recipe's eager row while it compiles: NAME.eager.json beside NAME.json."""
    stem, dot, suffix = out.rpartition(".")
    return f"{stem}.eager.{suffix}" if dot else f"{out}.eager"


def main(argv: list[str] | None = None) -> int:
    """Command line: run recipes on one model and save the rows as JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help=f"one of: {', '.join(models.list_models())}")
    parser.add_argument("--recipes", nargs="+", default=["bf16"], help="recipe names; the first is the reference")
    parser.add_argument("--out", required=True, help="where to write the rows (.json or .csv)")
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--warmup-steps", type=int)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--notes", default="", help="a line stored with every row")
    parser.add_argument("--compile", action="store_true", help="also compile the transformer and time it again")
    parser.add_argument("--fullgraph", action="store_true", help="compile with fullgraph=True")
    parser.add_argument("--gguf-dir", help="for gguf-* recipes: where MODEL-TYPE.gguf files are, written there "
                        "from the model's transformer first if missing")
    parser.add_argument("--regional", action="store_true",
                        help="compile only the repeated transformer blocks (compile_repeated_blocks)")
    args = parser.parse_args(argv)
    if args.regional and not args.compile:
        parser.error("--regional chooses what --compile compiles; add --compile")
    if args.compile and len(args.recipes) > 1:
        parser.error("--compile runs one recipe per command (compiled code stays in the process); "
                     "run the recipes one by one and join the rows")
    for name in args.recipes:
        recipes.get_recipe(name)  # every name checked before the first (long) load
    print(env.report(), flush=True)
    if args.gguf_dir:
        gguf_files = {name: write_gguf_file(args.model, recipes.get_recipe(name).gguf_type, args.gguf_dir)
                      for name in args.recipes if recipes.get_recipe(name).gguf_type}
    elif any(recipes.get_recipe(name).gguf_type for name in args.recipes):
        parser.error("gguf-* recipes need --gguf-dir, the folder of (or for) their GGUF files")
    else:
        gguf_files = {}
    runs = run_recipes(args.model, args.recipes, prompt=args.prompt, height=args.height, width=args.width,
                       steps=args.steps, warmup_steps=args.warmup_steps, repeats=args.repeats,
                       compile=args.compile, fullgraph=args.fullgraph, regional=args.regional,
                       eager_row_out=_eager_rows_path(args.out) if args.compile else None, notes=args.notes,
                       gguf_files=gguf_files)
    rows = [run.row for run in runs]
    print(f"wrote {measure.save_rows(rows, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
