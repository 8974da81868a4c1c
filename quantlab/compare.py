"""Chapter 07: one run of every recipe, side by side, and which one to choose.

`run_comparison` loads each recipe in turn, generates the same prompts with the same seed (three held-out
shape captions on the mini model, the blog's three style prompts on a real one), and measures memory, time,
size and error against bf16 (image PSNR and SSIM, and the SQNR of the transformer's output on identical
inputs). `pareto_front`, `recommend` and `SpotTheQuantized` (a quiz) work on what it measured. The
full-scale rows come from the lab (`python -m quantlab.lab.bench --reference ...`).
"""

from __future__ import annotations

import gc
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from . import env, gguf, measure, models, pipeline, quality, recipes, shapes, viz

__all__ = [
    "BLOG_PROMPTS",
    "default_prompts",
    "BLOG_H100",
    "CANDIDATE_RECIPES",
    "PRIORITIES",
    "Reference",
    "Comparison",
    "comparison_recipes",
    "run_comparison",
    "comparison_table",
    "pareto_front",
    "full_scale_table",
    "beside_blog",
    "Recommendation",
    "Advice",
    "recommend",
    "SpotTheQuantized",
    "quiz_rounds",
    "transformer_output",
    "make_reference",
    "RECOMMENDATION_RESULTS",
]

# The three style prompts of the HF blog "Exploring Quantization Backends in Diffusers".
BLOG_PROMPTS = {
    "Baroque": "Baroque style, a lavish palace interior with ornate gilded ceilings, intricate tapestries, and "
               "dramatic lighting over a grand staircase.",
    "Futurist": "Futurist style, a dynamic spaceport with sleek silver starships docked at angular platforms, "
                "surrounded by distant planets and glowing energy lines.",
    "Noir": "Noir style, a shadowy alleyway with flickering street lamps and a solitary trench-coated figure, framed "
            "by rain-soaked cobblestones and darkened storefronts.",
}


def default_prompts(model: str | None = None) -> dict[str, str]:
    """The comparison's prompts, {label: prompt}: three held-out shape captions for the mini model, which draws only
    those (labelled by what they ask for, "red square, bottom right"), and the blog's three style prompts for every
    other model. Chapter 07."""
    if models.get_model(model).trained:
        captions = shapes.held_out_captions(3)
        scenes = [shapes.parse_caption(caption) for caption in captions]
        return {f"{s.colour} {s.shape}, {s.position}": caption for s, caption in zip(scenes, captions)}
    return dict(BLOG_PROMPTS)


def _shape_captions(prompts: Sequence[str]) -> bool:
    """Whether every prompt is a caption the shape detector can check."""
    try:
        for prompt in prompts:
            shapes.parse_caption(prompt)
    except ValueError:
        return False
    return True


# The blog's H100 tables (FLUX.1-dev, 1024x1024, 50 steps): our recipe name -> (the blog's row,
# memory after loading, peak memory, seconds per image). Its "GB" are torch's GiB (bytes / 1024**3).
BLOG_H100: dict[str, tuple[str, float, float, float]] = {
    "bf16": ("BF16", 31.447, 36.166, 12),
    "bnb-4bit-nf4": ("bitsandbytes 4-bit", 12.584, 17.281, 12),
    "bnb-8bit": ("bitsandbytes 8-bit", 19.273, 24.432, 27),
    "torchao-int4wo": ("torchao int4_weight_only", 10.635, 14.654, 109),
    "torchao-int8wo": ("torchao int8_weight_only", 17.020, 21.482, 15),
    "torchao-float8wo": ("torchao float8_weight_only", 17.016, 21.488, 15),
    "quanto-int4": ("Quanto INT4", 12.254, 16.139, 109),
    "quanto-int8": ("Quanto INT8", 17.330, 21.814, 15),
    "quanto-float8": ("Quanto FP8", 16.395, 20.898, 16),
    "gguf-q2_k": ("GGUF Q2_k", 13.264, 17.752, 26),
    "gguf-q4_1": ("GGUF Q4_1", 16.838, 21.326, 23),
    "gguf-q8_0": ("GGUF Q8_0", 21.502, 25.973, 15),
    "fp8-layerwise-e4m3": ("FP8 layerwise (e4m3)", 23.682, 28.451, 13),
    "bnb-4bit-nf4+model-offload": ("bitsandbytes 4-bit + model CPU offload", 12.383, 12.383, 17),
    "bnb-8bit+model-offload": ("bitsandbytes 8-bit + model CPU offload", 19.182, 23.428, 27),
    "fp8-layerwise-e4m3+group-leaf-stream-offload": ("FP8 layerwise + group offload", 9.264, 14.232, 58),
}

# Every recipe the chapters taught, in the order the comparison runs them (bf16, the reference, first).
# `comparison_recipes` keeps those this device can run.
CANDIDATE_RECIPES = (
    "bf16",
    "bnb-8bit", "bnb-4bit-fp4", "bnb-4bit-nf4",
    "gguf-q8_0", "gguf-q4_1", "gguf-q2_k",
    "torchao-int8wo", "torchao-int8dq", "torchao-int4wo", "torchao-float8wo", "torchao-float8dq-row",
    "quanto-int8", "quanto-float8", "quanto-int4", "quanto-int2",
    "fp8-layerwise-e4m3", "fp8-layerwise-e5m2",
    "bnb-4bit-nf4+model-offload", "bnb-8bit+model-offload", "fp8-layerwise-e4m3+group-leaf-stream-offload",
    # chapter 08's backends that quantize while loading; BFL, AutoRound and Nunchaku Lite read a checkpoint first
    "sdnq-int8", "sdnq-uint4", "modelopt-fp8", "modelopt-int8",
)

PRIORITIES = ("memory", "speed", "quality")


# --- the comparison run -----------------------------------------------------------------------


@dataclass
class Reference:
    """What every recipe is compared with: the bf16 images, and the bf16 transformer's output on fixed inputs.
    Chapter 07."""

    prompts: list[str]
    images: list  # one per prompt, as uint8 arrays
    transformer_inputs: dict[str, Any]  # on the CPU
    transformer_output: torch.Tensor  # float32, on the CPU

    def save(self, path: str | Path) -> Path:
        """Save to `path` (a .safetensors file of the tensors and images) and `path`.json (the prompts and the
        inputs' other values): no pickle, so loading it runs no code."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {f"input.{k}": v.contiguous() for k, v in self.transformer_inputs.items() if isinstance(v, torch.Tensor)}
        tensors["output"] = self.transformer_output.contiguous()
        tensors.update({f"image.{i}": torch.from_numpy(np.ascontiguousarray(image)) for i, image in enumerate(self.images)})
        save_file(tensors, path)
        others = {k: v for k, v in self.transformer_inputs.items() if not isinstance(v, torch.Tensor)}
        Path(f"{path}.json").write_text(json.dumps({"prompts": self.prompts, "inputs": others}, indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Reference:
        """Read what `save` wrote."""
        from safetensors.torch import load_file

        # cloned: safetensors hands out tensors that view its file's bytes at whatever alignment the header leaves,
        # and quanto's int8 CPU matmul crashes (SIGSEGV) on a misaligned input
        tensors = {name: tensor.clone() for name, tensor in load_file(str(path)).items()}
        meta = json.loads(Path(f"{path}.json").read_text())
        inputs = {k.removeprefix("input."): v for k, v in tensors.items() if k.startswith("input.")}
        images = [tensors[f"image.{i}"].numpy() for i in range(len(meta["prompts"]))]
        return cls(meta["prompts"], images, {**inputs, **meta["inputs"]}, tensors["output"])


@dataclass
class Comparison:
    """What `run_comparison` returns: one row per recipe, each recipe's images (one per prompt), the reference.
    Chapter 07."""

    rows: list[measure.Measurement]
    images: dict[str, list]
    prompt_labels: list[str]
    reference: Reference | None = None
    skipped: dict[str, str] = field(default_factory=dict)  # recipe -> why it did not run here
    accuracy: dict[str, quality.PromptAccuracy] = field(default_factory=dict)  # recipe -> its shape pictures

    @property
    def frame(self):
        return comparison_table(self.rows)


def comparison_recipes(device: str | env.DeviceInfo | None = None,
                       candidates: Sequence[str] = CANDIDATE_RECIPES) -> tuple[list[str], dict[str, str]]:
    """The candidates that run on `device`, and for each other one why it does not. Chapter 07."""
    info = device if isinstance(device, env.DeviceInfo) else env.device_info(device)
    reasons = {name: recipes.why_not_here(name, info, env.default_dtype(info)) for name in candidates}
    return [name for name, why in reasons.items() if why is None], {n: why for n, why in reasons.items() if why}


def transformer_output(pipe, inputs: dict[str, Any]) -> torch.Tensor:
    """`pipe.transformer(**inputs)` on the pipeline's device, returned as float32 on the CPU.

    `inputs` are in the pipeline's dtype (`quality.capture_transformer_inputs` took them from a
    pipeline). Offloading hooks move the weights in as usual; only the inputs are placed here. Chapter 07.
    """
    device = pipe._execution_device
    with torch.no_grad():
        output = pipe.transformer(**{k: v.to(device) if isinstance(v, torch.Tensor) else v
                                     for k, v in inputs.items()})[0]
    return output.float().cpu()


def make_reference(pipe, prompts: Sequence[str], images: Sequence, call: dict[str, Any], seed: int = 0) -> Reference:
    """The reference from a bf16 pipeline: its `images`, and its transformer's output on the inputs of prompt 0.
    Chapter 07."""
    inputs = quality.capture_transformer_inputs(pipe, prompts[0], call, seed=seed)
    inputs = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    return Reference(list(prompts), [np.asarray(image) for image in images], inputs, transformer_output(pipe, inputs))


def run_comparison(model: str | None = None, recipe_names: Sequence[str] | None = None, *,
                   prompts: dict[str, str] | None = None, seed: int = 0, steps: int | None = None,
                   warmup_steps: int | None = 2, gguf_dir: str | Path | None = None,
                   reference: str | Path | Reference | None = None, device: str | None = None,
                   on_row=None, errors: bool = True, accuracy_captions: int = 0,
                   checkpoints: dict[str, str | Path] | None = None) -> Comparison:
    """Run every recipe of `recipe_names` (default: every candidate that runs here) on the same prompts and seed.

    The reference is the first recipe, which must be bf16, unless `reference` is given: a `Reference`,
    or a file that one is loaded from (and saved to after a bf16 run, when it does not exist yet), so
    that recipes run in separate processes share one. `on_row(row)` is called as each recipe ends.
    With `errors=False` nothing is compared with bf16 (no reference needed): memory and time only.
    With `accuracy_captions=n` each row also has the prompt accuracy on `n` held-out shape captions; without, on
    a trained model whose prompts are all shape captions (the mini model's default), the prompts' own images are
    scored (`accuracy[recipe]` holds them). `prompts` defaults to `default_prompts(model)`. A recipe that reads a
    pre-quantized checkpoint (chapter 08) finds it in `checkpoints[recipe]`.
    """
    spec = models.get_model(model)
    prompts = prompts or default_prompts(spec.name)
    device = device or env.default_device()
    skipped: dict[str, str] = {}
    if recipe_names is None:
        recipe_names, skipped = comparison_recipes(device)
    for name in recipe_names:  # every name checked before the first (long) load
        if recipes.get_recipe(name).checkpoint and name not in (checkpoints or {}):
            raise ValueError(f"Recipe {name!r} reads a pre-quantized checkpoint: pass checkpoints={{{name!r}: <path>}}.")
    reference_file = Path(reference) if isinstance(reference, (str, Path)) else None
    if isinstance(reference, Reference):
        ref = reference
    elif reference_file is not None and reference_file.exists():
        ref = Reference.load(reference_file)
    else:
        ref = None
    if ref is None and recipe_names[0] != "bf16" and errors:
        raise ValueError(f"The comparison needs a bf16 reference: start the recipes with 'bf16', or pass "
                         f"reference=<a file a bf16 run saved>. Got {recipe_names[0]!r} first.")
    if ref is not None and ref.prompts != list(prompts.values()):
        raise ValueError("The reference was made with other prompts; make a new one with a bf16 run.")
    call = spec.call_kwargs()
    if steps:
        call["num_inference_steps"] = steps
    score_prompts = not accuracy_captions and bool(spec.trained) and _shape_captions(list(prompts.values()))

    rows, images, accuracy = [], {}, {}
    for name in recipe_names:
        gguf_file, write_report = None, None
        recipe = recipes.get_recipe(name)
        if recipe.gguf_type:
            if gguf_dir is None:
                raise ValueError(f"Recipe {name!r} loads a GGUF file: pass gguf_dir=<a folder for the files>.")
            gguf_file, write_report = gguf.write_model_file(spec.name, recipe.gguf_type, gguf_dir)
        run = pipeline.run_recipe(
            spec.name, name, prompt=list(prompts.values()), steps=steps, seed=seed, warmup=1,
            warmup_steps=warmup_steps, repeats=len(prompts), device=device, keep_pipeline=True,
            reference_image=None if ref is None else list(ref.images),
            notes=f"the {len(prompts)} prompts {'; '.join(prompts)}, seed {seed}", accuracy_captions=accuracy_captions,
            **({"gguf_file": gguf_file} if gguf_file else {}),
            **({"checkpoint": checkpoints[name]} if recipe.checkpoint else {}),
        )
        if ref is None and errors:  # this is the bf16 run
            ref = make_reference(run.pipe, list(prompts.values()), run.images, call, seed=seed)
            if reference_file is not None:
                ref.save(reference_file)
            run.row.psnr_db, run.row.ssim = float("inf"), 1.0
        run.row.extra.update(backend=recipe.backend, prompts=list(prompts))
        if errors:
            output = transformer_output(run.pipe, ref.transformer_inputs)
            run.row.extra["sqnr_db"] = quality.sqnr_db(output, ref.transformer_output)
        if gguf_file:
            run.row.extra["gguf_file_bytes"] = Path(gguf_file).stat().st_size
        if write_report is not None:
            run.row.extra["gguf_write_s"] = write_report.seconds
        rows.append(run.row)
        images[name] = run.images
        if run.accuracy is None and score_prompts:  # the prompts are held-out shape captions: score their images
            captions = list(prompts.values())
            run.accuracy = quality.PromptAccuracy(
                shapes.prompt_accuracy([np.asarray(image) for image in run.images], captions), captions, run.images)
            run.row.prompt_accuracy = run.accuracy.accuracy
        if run.accuracy is not None:
            accuracy[name] = run.accuracy
        del run
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        if on_row is not None:
            on_row(rows[-1])
    return Comparison(rows, images, list(prompts), ref, skipped, accuracy)


def comparison_table(rows):
    """The comparison's columns, one row per recipe: memory, time, size and the three error figures.

    `weights_gib` is the bytes of every component's weights as loaded (quantized ones included); a GGUF
    row also keeps its file's size in `extra.gguf_file_bytes`.

    On a GPU `peak_mem_gib` is the peak GPU memory (reserved); on a CPU, where there is no GPU
    memory, it is the peak host RSS, and `peak_mem_kind` says which. Chapter 07.
    """
    frame = measure.to_frame(rows)
    measure.require_columns(frame, "recipe", "extra")
    extra = frame["extra"]
    on_gpu = frame["peak_gpu_mem_gib"].notna()
    table = frame[["recipe"]].copy()
    table["backend"] = extra.map(lambda e: e.get("backend"))
    table["mem_after_load_gib"] = frame["mem_after_load_gib"]
    table["peak_mem_gib"] = frame["peak_gpu_mem_gib"].where(on_gpu, frame["peak_host_rss_gib"])
    table["peak_mem_kind"] = np.where(on_gpu, "GPU", "host RSS")
    table["s_per_image"] = frame["s_per_image"]
    table["weights_gib"] = frame["weights_bytes"].astype(float) / measure.GIB
    table["psnr_db"] = frame["psnr_db"]
    table["ssim"] = frame["ssim"]
    table["sqnr_db"] = extra.map(lambda e: e.get("sqnr_db"))
    table["prompt_accuracy"] = frame["prompt_accuracy"] if "prompt_accuracy" in frame else None
    numbers = ["mem_after_load_gib", "peak_mem_gib", "s_per_image", "weights_gib", "psnr_db", "ssim", "sqnr_db",
               "prompt_accuracy"]
    table[numbers] = table[numbers].astype(float)  # a figure not measured is NaN, not None
    table["error"] = extra.map(lambda e: e.get("error"))
    table["device"] = frame["device"]
    return table


def pareto_front(frame, columns: Sequence[str] = ("peak_mem_gib", "s_per_image")):
    """A boolean Series: True for each row that no other row beats, lower being better in every column.

    A row is beaten (dominated) when another is no worse in every column and better in one. Rows
    with a missing value are never on the front. Chapter 07.
    """
    import pandas as pd

    measure.require_columns(frame, *columns)
    values = frame[list(columns)].to_numpy(dtype=float)
    complete = ~np.isnan(values).any(axis=1)
    on_front = []
    for i, row in enumerate(values):
        if not complete[i]:
            on_front.append(False)
            continue
        others = values[complete]
        beaten = ((others <= row).all(axis=1) & (others < row).any(axis=1)).any()
        on_front.append(not beaten)
    return pd.Series(on_front, index=frame.index, name="pareto")


# --- full scale, beside the blog ----------------------------------------------------------------


FULL_SCALE_RESULTS = "07_compare_flux-dev-shaped"

def full_scale_table(results: str = FULL_SCALE_RESULTS):
    """The committed full-scale comparison as `comparison_table`, plus what the blog comparison needs.

    `reserved_after_load_gib` is what the blog printed as "memory after loading":
    `torch.cuda.max_memory_reserved()` right after loading (our `extra.peak_gpu_reserved_during_load_gib`).
    `s_per_image_50_steps` is `s_per_image` for rows measured at 50 steps, and projected from the
    median step time for the slow rows measured with fewer (`steps` says how many). Chapter 07.
    """
    rows = measure.load_rows(measure.results_dir() / f"{results}.json")
    table = comparison_table(rows)
    table["reserved_after_load_gib"] = [r.extra.get("peak_gpu_reserved_during_load_gib") for r in rows]
    table["steps"] = [r.steps for r in rows]
    table["s_per_image_50_steps"] = [r.s_per_image if r.steps == 50 else measure.projected_s_per_image(r, steps=50)
                                     for r in rows]
    return table


def beside_blog(table, threshold: float = 0.20):
    """Our full-scale rows beside the blog's H100 table, one row per recipe the blog measured.

    Columns `*_ours`, `*_blog` and `*_ratio` (ours / blog) for memory after loading, peak memory and
    seconds per 50-step image (`full_scale_table`'s columns); `ours_status` is "measured", "not run", or
    the error a failed run recorded; `differs` lists the columns where the ratio is off by more than `threshold`
    (chapter 07 says why, one line each).
    """
    import pandas as pd

    by_recipe = table.set_index("recipe")
    records = []
    for recipe, (blog_row, blog_loaded, blog_peak, blog_s) in BLOG_H100.items():
        ours = by_recipe.loc[recipe] if recipe in by_recipe.index else None
        error = None if ours is None else ours.get("error")
        if ours is not None and isinstance(error, str):
            ours = None  # a recorded failure: no figures, and `ours_status` says why
        status = "measured" if ours is not None else (error if isinstance(error, str) else "not run")
        record = {"recipe": recipe, "blog_row": blog_row, "ours_status": status}
        for column, mine, theirs in (
            ("mem_after_load_gib", None if ours is None else ours["reserved_after_load_gib"], blog_loaded),
            ("peak_mem_gib", None if ours is None else ours["peak_mem_gib"], blog_peak),
            ("s_per_image", None if ours is None else ours["s_per_image_50_steps"], blog_s),
        ):
            mine = None if mine is None or pd.isna(mine) else float(mine)
            record[f"{column}_ours"] = mine
            record[f"{column}_blog"] = theirs
            record[f"{column}_ratio"] = None if mine is None else mine / theirs
        differs = [c for c in ("mem_after_load_gib", "peak_mem_gib", "s_per_image")
                   if record[f"{c}_ratio"] is not None and abs(record[f"{c}_ratio"] - 1) > threshold]
        record["differs"] = ", ".join(differs)
        records.append(record)
    return pd.DataFrame(records)


# --- the decision helper ----------------------------------------------------------------------

# Where `recommend` looks, in this order (the first file that holds a recipe wins): the comparison, the memory and
# GGUF chapters, the newer backends, and the simulated Colab T4 (whole scripts in fp16 with little host RAM).
RECOMMENDATION_RESULTS = (FULL_SCALE_RESULTS, "05_memory_flux-dev-shaped", "02_gguf_flux-dev-shaped",
                          "08_newer_flux-dev-shaped", "09_colab_t4_sim_flux-dev-shaped")


@dataclass
class Recommendation:
    """One recommended recipe, why, its measured figures (`s_per_image` per image at the script's 28 steps), and its
    whole script. Chapter 07."""

    recipe: str
    reason: str
    peak_gpu_mem_gib: float | None
    host_ram_gib: float | None
    s_per_image: float | None
    sqnr_db: float | None
    code: str | None = None  # the recipe's whole script with this machine's settings, ready to paste


@dataclass
class Advice:
    """What `recommend` returns: recipes in order of the priority, and why each other measured one was left out.
    Chapter 07."""

    priority: str
    recommendations: list[Recommendation]
    cannot_run: dict[str, str]
    notes: list[str]

    @property
    def code(self) -> str | None:
        """The first recommendation's whole script, or None when nothing fits."""
        return self.recommendations[0].code if self.recommendations else None

    def __str__(self) -> str:
        lines = [f"Priority: {self.priority}."]
        if not self.recommendations:
            lines.append("No measured recipe fits this machine.")
        for rank, rec in enumerate(self.recommendations, 1):
            lines.append(f"{rank}. {rec.recipe}: {rec.reason}")
        lines += [f"Note: {note}" for note in self.notes]
        if self.cannot_run:
            lines.append("Could not run here:")
            lines += [f"  - {name}: {why}" for name, why in self.cannot_run.items()]
        if self.code:
            lines += ["", f"The whole script for {self.recommendations[0].recipe}, ready to paste:", "", self.code]
        return "\n".join(lines)

    def _repr_markdown_(self) -> str:
        text, _, code = str(self).partition("\n\nThe whole script for ")
        markdown = "\n\n".join(text.split("\n"))
        if code:
            title, _, script = code.partition(", ready to paste:\n\n")
            markdown += f"\n\nThe whole script for {title}, ready to paste:\n\n```python\n{script}\n```"
        return markdown


def _candidate_rows(results: Sequence[str], scripted_only: bool):
    rows, seen = [], set()
    script_size = (recipes.SCRIPT_SETTINGS["HEIGHT"], recipes.SCRIPT_SETTINGS["WIDTH"])  # what the scripts generate
    for name in results:
        path = measure.results_dir() / f"{name}.json"
        latest = {}  # within a file the later row wins: a re-measurement (the T4 rows at 14.25 GiB after 15)
        for row in measure.load_rows(path) if path.exists() else []:
            recipe = recipes.RECIPES.get(row.recipe)
            measured = (row.s_per_image is not None or row.ms_per_step is not None) and not row.extra.get("error")
            if (row.recipe in seen or recipe is None or not measured or (row.height, row.width) != script_size
                    or row.extra.get("superseded") or (scripted_only and not recipe.script)):
                continue  # the first file wins; compiled, direct-API, failed and superseded rows are not advice
            latest[row.recipe] = (name, row, recipe)
        seen.update(latest)
        rows.extend(latest.values())
    return rows


def _host_gib(row: measure.Measurement, recipe: recipes.Recipe) -> tuple[float, str]:
    """The host RAM a row needed, and how it was counted."""
    if recipe.low_ram is not None and row.extra.get("peak_host_anon_gib") is not None:
        # a whole script on the simulated T4: anonymous memory decides, since the kernel can drop the
        # memory-mapped checkpoint pages that VmRSS also counts
        return row.extra["peak_host_anon_gib"], "anonymous, the part the kernel cannot drop"
    host = max(v for v in (row.peak_host_rss_gib, row.extra.get("peak_host_rss_generating_gib"), 0.0) if v is not None)
    how = "" if row.extra.get("peak_host_rss_generating_gib") is not None else "while loading; not recorded while generating"
    return host, how


def _seconds(row: measure.Measurement, recipe: recipes.Recipe, device: env.DeviceInfo) -> tuple[float | None, str]:
    """Seconds per image at the whole script's steps (`SCRIPT_SETTINGS`, 28) and how they were found: a row measured
    at other steps is projected with its median step time; a whole T4 script on a GPU without bf16 (a T4's kind)
    takes the T4 estimate, and on any other GPU the step time measured on the simulated T4's GPU."""
    steps = int(recipes.SCRIPT_SETTINGS["STEPS"])
    if recipe.low_ram is not None:
        estimate = row.extra.get("t4_estimate_s_per_step")
        if estimate is not None and not device.bf16:
            return estimate * steps, f"{estimate * steps:.0f} s per {steps}-step image on a T4 (estimated from FLOPs)"
        seconds = row.ms_per_step * steps / 1e3
        return seconds, f"{seconds:.1f} s per {steps}-step image (from {row.ms_per_step:.0f} ms per step)"
    if row.steps == steps and row.s_per_image is not None:
        return row.s_per_image, f"{row.s_per_image:.1f} s per {steps}-step image"
    seconds = measure.projected_s_per_image(row, steps=steps)
    if seconds is not None:
        return seconds, (f"{seconds:.1f} s per {steps}-step image (projected from {row.s_per_image:.1f} s at "
                         f"{row.steps} steps)")
    return row.s_per_image, f"{row.s_per_image:.1f} s per {row.steps}-step image"


def recommend(gpu_mem_gib: float | None, host_ram_gib: float, compute_capability: tuple[int, int] | None,
              priority: str = "memory", *, gpus: int = 1, count: int = 3, margin_gib: float = 0.5,
              results: Sequence[str] = RECOMMENDATION_RESULTS, scripted_only: bool = True) -> Advice:
    """Recipes for FLUX.1-dev at 1024×1024 on a machine, from the committed full-scale measurements, each with the
    whole script to paste (`Recipe.code`, the same code the chapters' whole-recipe cells show).

    `gpu_mem_gib` and `compute_capability` describe the GPU (None for none), `gpus` how many there are
    (recipes that spread the pipeline over several need as many), and `host_ram_gib` the RAM (a free Colab
    runtime: `env.COLAB_HOST_RAM_GIB`). A recipe fits when its measured peak GPU memory plus `margin_gib` fits
    the GPU, its host peak fits the RAM (for a whole T4 script, the anonymous memory that the simulated T4
    measured), and the GPU has what it needs. Then `priority` orders them: "memory" (lowest peak), "speed"
    (fewest seconds per image at the scripts' 28 steps, `_seconds`) or "quality" (highest SQNR of the transformer
    output against bf16). Where two
    files hold a recipe, the first in `results` wins. With `scripted_only` (the default) only recipes with a
    whole script count (chapter 07).
    """
    if priority not in PRIORITIES:
        raise ValueError(f"Unknown priority {priority!r}. Valid priorities: {', '.join(PRIORITIES)}.")
    if gpu_mem_gib is None or compute_capability is None:
        device = env.DeviceInfo("cpu", "a CPU without a GPU")
    else:
        device = env.describe_gpu(f"a GPU with {gpu_mem_gib:g} GiB", compute_capability, gpu_mem_gib)
    dtype = env.default_dtype(device)
    fitting, cannot_run, notes = [], {}, []
    for source, row, recipe in _candidate_rows(results, scripted_only):
        host, host_how = _host_gib(row, recipe)
        why_not = recipes.why_not_here(recipe, device, None if recipe.low_ram else dtype, packages=False)
        if why_not:
            cannot_run[row.recipe] = why_not
            continue
        if device.kind == "cpu":
            cannot_run[row.recipe] = ("measured on a GPU only; on a CPU every recipe runs, but a 12B FLUX.1-dev "
                                      "step takes minutes, so the course uses the mini model there")
            continue
        needed_gpus = row.extra.get("device_count", 1)
        if needed_gpus > gpus:
            cannot_run[row.recipe] = f"spreads the pipeline over {needed_gpus} GPUs; this machine has {gpus}"
            continue
        peak = row.peak_gpu_mem_gib
        if peak + margin_gib > gpu_mem_gib:
            cannot_run[row.recipe] = (f"needs {peak:.1f} GiB of GPU memory at its peak (+{margin_gib} GiB margin); "
                                      f"this GPU has {gpu_mem_gib:g}")
            continue
        if host > host_ram_gib:
            cannot_run[row.recipe] = (f"its host RAM peaked at {host:.1f} GiB on the GPU machine; this one has "
                                      f"{host_ram_gib:g}")
            continue
        seconds, timing = _seconds(row, recipe, device)
        fitting.append((row, recipe, host, host_how, source, seconds, timing))
    if not device.bf16 and fitting:
        notes.append(f"A GPU of compute capability {'.'.join(map(str, device.compute_capability))} has no bf16: load in "
                     "float16 (dtype=torch.float16), as the scripts below do. Memory is the same; times measured on "
                     "an H100 will be longer here (a low-RAM script's time is already a T4's, estimated).")
    key = {
        "memory": lambda item: item[0].peak_gpu_mem_gib,
        "speed": lambda item: item[5] if item[5] is not None else np.inf,
        "quality": lambda item: -(item[0].extra.get("sqnr_db") if item[0].extra.get("sqnr_db") is not None
                                  else -np.inf),
    }[priority]
    chosen = []
    for row, recipe, host, host_how, source, seconds, timing in sorted(fitting, key=key)[:count]:
        sqnr = row.extra.get("sqnr_db")
        sqnr_text = "SQNR not measured" if sqnr is None else (
            "identical to bf16" if np.isinf(sqnr) else f"transformer SQNR {sqnr:.1f} dB against bf16")
        host_text = f"host RAM {host:.1f} of {host_ram_gib:g} GiB" + (f" ({host_how})" if host_how else "")
        cap = row.extra.get("vram_cap_gib")
        where = f"measured on {row.device}" + (f" capped at {cap:g} GiB (a simulated T4)" if cap else "")
        reason = (f"peak {row.peak_gpu_mem_gib:.1f} GiB of {gpu_mem_gib:g} GiB GPU, {host_text}, {timing}; {where}, "
                  f"{sqnr_text} [results/{source}.json]")
        code = recipe.code(**({} if device.bf16 or recipe.low_ram else {"DTYPE": "float16"})) if recipe.script else None
        chosen.append(Recommendation(row.recipe, reason, row.peak_gpu_mem_gib, host, seconds, sqnr, code))
    return Advice(priority, chosen, cannot_run, notes)


# --- the quiz ---------------------------------------------------------------------------------


class SpotTheQuantized:
    """"Spot the quantized image": each round shows the bf16 image and a quantized one in random order.

    The learner clicks the one they think is quantized; the answer is revealed and the score kept.
    `rounds` is a list of (reference image, quantized image, recipe name, prompt label), played in a
    seeded random order, the first `limit` of them. Drive it
    with the buttons (`choice_buttons[i].click()`, `next_button.click()`), as a test does. Chapter 07.
    """

    def __init__(self, rounds: Sequence[tuple[Any, Any, str, str]], seed: int = 0, limit: int | None = None,
                 width: int = 256):
        import ipywidgets as widgets

        if not rounds:
            raise ValueError("The quiz needs at least one round: (reference image, quantized image, recipe, prompt).")
        self.rounds = list(rounds)
        rng = random.Random(seed)
        rng.shuffle(self.rounds)
        self.rounds = self.rounds[:limit]  # after shuffling, so a limit still draws from every recipe
        # where the quantized image is shown in each round: 0 (left) or 1 (right)
        self.quantized_position = [rng.randrange(2) for _ in self.rounds]
        self.round = 0
        self.score = 0
        self.answered = 0
        self._answered_this_round = False
        self.images = [widgets.Image(format="png", width=width) for _ in range(2)]
        self.choice_buttons = [widgets.Button(description=f"{side} is quantized") for side in ("left", "right")]
        for position, button in enumerate(self.choice_buttons):
            button.on_click(lambda _button, position=position: self.choose(position))
        self.next_button = widgets.Button(description="next round", disabled=True)
        self.next_button.on_click(lambda _button: self.next_round())
        self.question = widgets.HTML()
        self.answer = widgets.HTML()
        self.scoreboard = widgets.HTML()
        self.widget = widgets.VBox([self.question, widgets.HBox(self.images), widgets.HBox(self.choice_buttons),
                                    self.answer, self.next_button, self.scoreboard])
        self._show()

    @property
    def finished(self) -> bool:
        """Every round answered."""
        return self.answered == len(self.rounds)

    def _show(self) -> None:
        reference, quantized, _recipe, prompt = self.rounds[self.round]
        left, right = (quantized, reference) if self.quantized_position[self.round] == 0 else (reference, quantized)
        self.images[0].value, self.images[1].value = viz.png_bytes(left), viz.png_bytes(right)
        self.question.value = (f"<b>Round {self.round + 1} of {len(self.rounds)}</b> ({prompt}): one image is bf16, "
                               "the other quantized. Which is quantized?")
        self.answer.value = ""
        for button in self.choice_buttons:
            button.disabled = False
        self.next_button.disabled = True
        self._answered_this_round = False
        self._update_score()

    def _update_score(self) -> None:
        self.scoreboard.value = f"Score: {self.score} of {self.answered}"

    def choose(self, position: int) -> bool:
        """Answer this round: `position` 0 (left) or 1 (right) is the quantized one. Returns whether that was right.

        A second answer to the same round is ignored (and returns False).
        """
        if position not in (0, 1):
            raise ValueError(f"position is 0 (left) or 1 (right), not {position!r}.")
        if self._answered_this_round:
            return False
        _reference, _quantized, recipe, _prompt = self.rounds[self.round]
        truth = self.quantized_position[self.round]
        correct = position == truth
        self.answered += 1
        self.score += int(correct)
        self._answered_this_round = True
        side = ("left", "right")[truth]
        self.answer.value = (f"{'Right' if correct else 'Not this time'}: the {side} image was <b>{recipe}</b>, "
                             f"the other bf16.")
        for button in self.choice_buttons:
            button.disabled = True
        last = self.round == len(self.rounds) - 1
        self.next_button.disabled = last
        if last:
            self.answer.value += f" That was the last round: {self.score} of {self.answered}."
        self._update_score()
        return correct

    def next_round(self) -> None:
        """Go to the next round (after answering this one)."""
        if not self._answered_this_round or self.round == len(self.rounds) - 1:
            return
        self.round += 1
        self._show()

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)


def quiz_rounds(comparison: Comparison, recipe_names: Sequence[str] | None = None) -> list[tuple]:
    """Quiz rounds from a comparison: for each recipe and prompt, (bf16 image, recipe image, recipe, prompt).
    Chapter 07."""
    reference = comparison.images["bf16"]
    names = [n for n in (recipe_names or comparison.images) if n != "bf16"]
    return [(reference[i], comparison.images[name][i], name, label)
            for name in names for i, label in enumerate(comparison.prompt_labels)]
