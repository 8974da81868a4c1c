"""The pipeline lab: `python -m quantlab.lab.bench`, how the committed whole-pipeline rows are made.

Each recipe is loaded and run end to end (`quantlab.pipeline.run_recipe`): memory after loading, peak memory,
host RAM, time per step and per image; a recipe that compiles is timed eagerly too and checked against its
eager output. With `--reference`, recipes run as chapter 07 compares them (`compare.run_comparison`): the
same prompts and seed, PSNR, SSIM and the transformer's SQNR against bf16 (the bf16 run writes the reference).
`--quanto-direct` quantizes the transformer alone with Quanto's own `quantize()` and `freeze()`.

    python -m quantlab.lab.bench --model flux-dev-shaped --recipes bf16 bnb-4bit-nf4 --repeats 3 \\
        --out results/01_bitsandbytes_flux-dev-shaped.json
    python -m quantlab.lab.bench --model flux-dev-shaped --recipes bf16 gguf-q2_k --reference /tmp/ref.safetensors \\
        --gguf-dir /tmp/gguf --out results/07_compare_flux-dev-shaped.json
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import torch

from .. import compare, env, gguf, measure, models, newer, pipeline, quality, quanto, recipes
from .runner import Scenario, common_arguments, random_transformer_inputs, run_scenarios

__all__ = ["measure_recipe", "quantize_and_compare", "main"]


def write_checkpoint(model: str, name: str, folder: str | Path) -> Path:
    """The pre-quantized checkpoint chapter 08's recipe `name` reads for `model`, written under `folder` first if
    missing: a BFL fp8r file (`newer.write_bfl_file`), or an AutoRound W4A16 folder (`newer.autoround_quantize`,
    round-to-nearest, calibrated on nothing, as a GPU machine has no calibration set to download)."""
    from diffusers import FluxTransformer2DModel

    recipe, spec = recipes.get_recipe(name), models.get_model(model)
    device = env.default_device()
    base = Path(folder) / f"{spec.name.replace('/', '--')}-{recipe.name}"
    if recipe.checkpoint == "bfl":
        path = base.with_suffix(".safetensors")
        if not path.is_file():
            transformer = FluxTransformer2DModel.from_pretrained(models.model_path(spec.name), subfolder="transformer",
                                                                 dtype=torch.bfloat16).to(device)
            newer.write_bfl_file(transformer, path)
        return path
    if recipe.name == "autoround-w4a16":
        if not (base / "transformer" / "config.json").is_file():
            newer.autoround_quantize(models.model_path(spec.name), base, [pipeline.DEFAULT_PROMPT], iters=0,
                                     call_kwargs=spec.call_kwargs(), device=device)
        return base
    raise ValueError(f"Recipe {name!r} reads a checkpoint the lab cannot write ({recipe.checkpoint}).")


def measure_recipe(model: str, name: str, *, gguf_dir: str | None = None, eager_row_out: str | None = None,
                   **kwargs) -> measure.Measurement:
    """One recipe end to end, as `pipeline.run_recipe` measures it; a GGUF recipe's file is written first if missing.

    `eager_row_out`, if given, receives a compiling recipe's eager row before compiling starts, so that a run
    cut off while compiling keeps it; it is removed once the compiled row exists.
    """
    recipe = recipes.get_recipe(name)
    gguf_file, report = (None, None)
    if recipe.gguf_type or recipe.checkpoint:
        if gguf_dir is None:
            raise ValueError(f"Recipe {name!r} loads a file: pass --gguf-dir, the folder of (or for) the files.")
    if recipe.gguf_type:
        gguf_file, report = gguf.write_model_file(model, recipe.gguf_type, gguf_dir)
    if recipe.checkpoint:
        kwargs["checkpoint"] = write_checkpoint(model, name, gguf_dir)
    keep_eager = (lambda row: measure.save_rows([row], eager_row_out)) if eager_row_out else None
    run = pipeline.run_recipe(model, recipe, progress=True, on_eager_row=keep_eager,
                              **({"gguf_file": gguf_file} if gguf_file else {}), **kwargs)
    if eager_row_out and "compile_error" not in run.row.extra:  # kept only while compiling, or when it failed
        Path(eager_row_out).unlink(missing_ok=True)
    if gguf_file:
        run.row.extra["gguf_file_bytes"] = Path(gguf_file).stat().st_size
    if report is not None:
        run.row.extra.update(gguf_write_s=report.seconds, gguf_write_params_per_s=report.params_per_s)
    return run.row


def _compared(model: str, name: str, **kwargs) -> measure.Measurement:
    """One recipe as chapter 07 compares it, against the bf16 reference file."""
    if recipes.get_recipe(name).checkpoint:
        kwargs["checkpoints"] = {name: write_checkpoint(model, name, kwargs["gguf_dir"])}
    comparison = compare.run_comparison(model, [name], **kwargs)
    return comparison.rows[0]


def quantize_and_compare(model: str | None = None, weights: str = "int8", device: str | None = None,
                         height: int = 1024, width: int = 1024, text_tokens: int = 512, seed: int = 0,
                         repeats: int = 3) -> measure.Measurement:
    """A fresh transformer on `device`, Quanto's `quantize()`+`freeze()` timed, then one forward pass on seeded
    random inputs compared with the unquantized output (results/04_quanto_gpu_checks.json)."""
    from diffusers import FluxTransformer2DModel
    from optimum.quanto import freeze, quantize

    spec = models.get_model(model)
    device = device or env.default_device()
    dtype = env.default_dtype(env.device_info(device))
    path = models.model_path(spec.name)
    transformer = FluxTransformer2DModel.from_pretrained(path, subfolder="transformer", dtype=dtype).to(device)
    inputs = random_transformer_inputs(transformer.config, height, width, text_tokens, device=device, dtype=dtype,
                                       seed=seed)
    with torch.no_grad():
        reference = transformer(**inputs)[0].float().cpu()
    measure.synchronize(device)
    start = time.perf_counter()
    quantize(transformer, weights=quanto.qtype(weights))
    freeze(transformer)
    measure.synchronize(device)
    quantize_s = time.perf_counter() - start
    with torch.no_grad():
        output = transformer(**inputs)[0].float().cpu()
        forward = measure.time_callable(lambda: transformer(**inputs), warmup=0, repeats=repeats, device=device)
    where = " on the GPU" if device.startswith("cuda") else ""
    return measure.new_row(
        spec.name, f"quanto-{weights} direct quantize+freeze{where}", device, height=height, width=width,
        weights_bytes=measure.weights_bytes(transformer),
        extra={"quantize_freeze_s": quantize_s, "forward_ms": forward.median_s * 1000,
               "transformer_sqnr_db": quality.sqnr_db(output, reference),
               "output_finite": bool(torch.isfinite(output).all()),
               "weight_tensor_types": quanto.weight_tensor_types(transformer),
               "inputs": f"seeded random latents and text embeddings, {height}x{width}, {text_tokens} text tokens"})


def main(argv: list[str] | None = None) -> int:
    """Command line: each recipe in turn, one row each, saved as each ends."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_arguments(parser, model=None)
    parser.add_argument("--recipes", nargs="*", default=[], help="recipe names (see ql.list_recipes())")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--warmup-steps", type=int)
    parser.add_argument("--prompt", default=pipeline.DEFAULT_PROMPT)
    parser.add_argument("--notes", default="", help="a line stored with every row")
    parser.add_argument("--gguf-dir", help="for recipes that read a file (GGUF, BFL, AutoRound): where it is, or is "
                        "written")
    parser.add_argument("--reference", help="a .safetensors file: written by the bf16 run, read by the rest; with it, "
                        "each recipe is compared as chapter 07 compares them (PSNR, SSIM, SQNR against bf16)")
    parser.add_argument("--quanto-direct", nargs="*", default=[], choices=("int8", "float8", "int4", "int2"),
                        help="Quanto weight types for quantize()+freeze() on the transformer alone")
    args = parser.parse_args(argv)
    spec = models.get_model(args.model)
    for name in args.recipes:  # every name checked before the first (long) load
        recipe = recipes.get_recipe(name)
        if (recipe.gguf_type or recipe.checkpoint) and not args.gguf_dir:
            parser.error(f"{name} loads a file: give --gguf-dir, the folder of (or for) its file")
    if not args.recipes and not args.quanto_direct:
        parser.error("nothing to run: give --recipes or --quanto-direct")
    size = {"height": args.height, "width": args.width}
    if args.reference:
        scenarios = [Scenario(name, functools.partial(
            _compared, spec.name, name, steps=args.steps, warmup_steps=args.warmup_steps, gguf_dir=args.gguf_dir,
            reference=args.reference)) for name in args.recipes]
    else:
        stem, dot, suffix = args.out.rpartition(".")
        eager_out = f"{stem}.eager.{suffix}" if dot else f"{args.out}.eager"
        scenarios = [Scenario(name, functools.partial(
            measure_recipe, spec.name, name, gguf_dir=args.gguf_dir, eager_row_out=eager_out, prompt=args.prompt,
            steps=args.steps, warmup_steps=args.warmup_steps, repeats=args.repeats, notes=args.notes, **size))
            for name in args.recipes]
    scenarios += [Scenario(f"quanto-{w} direct quantize+freeze" + (" on the GPU" if torch.cuda.is_available() else ""),
                           functools.partial(quantize_and_compare, spec.name, w, repeats=args.repeats))
                  for w in args.quanto_direct]
    run_scenarios(scenarios, args.out, model=spec.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
