"""The fit planner: before anything is downloaded, predict what a recipe needs from the model's config.

`weights_bytes` counts each component's weights as a recipe stores them, from the parameter shapes of
a meta model (no weights): Linear weights at the recipe's bits plus its scales, the rest in 16 bits.
`predict_peak_gpu_gib` adds what is on the GPU at once (everything, the largest component with model
offload, or one layer with sequential offload) and the activations of generating, whose sizes were
measured once on a bf16 run at 1024×1024 (`ACTIVATIONS_1024_GIB`) and scale with the pixel count.
`plan` says whether a recipe fits a GPU, and which recipes would. Chapter 07 uses `plan`, `weights_bytes` and
`predict_peak_gpu_gib`. It predicts GPU memory only, not host RAM: the planner of the low-RAM Colab scripts (each
stage's GPU peak, the host RAM, a T4's time per step) is in the lab, `quantlab.lab.t4_plan`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from . import env, models, recipes
from .env import GIB

__all__ = [
    "ACTIVATIONS_1024_GIB",
    "weights_bytes",
    "meta_components",
    "pixel_scale",
    "T5_UNQUANTIZED",
    "predict_peak_gpu_gib",
    "FitPlan",
    "plan",
]

# Peak GPU memory while generating, above the weights that are on the GPU, at 1024×1024 in 16 bits,
# as torch.cuda.max_memory_reserved() counts it. Measured once, on bf16 rows of the full-scale runs
# (results/): everything on the GPU, 36.30 GiB peak over 31.44 after loading; model offload, 23.24
# over a 22.17 GiB transformer; sequential offload, 2.56 with nothing resident (the VAE decode).
ACTIVATIONS_1024_GIB = {
    "all-on-gpu": 4.86,  # the transformer's steps, then the VAE decode, with the weights resident
    "transformer": 1.07,  # one denoising step, the transformer alone on the GPU (model offload)
    "text_encoder_2": 0.14,  # T5 encoding 512 tokens
    "vae": 2.42,  # decoding the latent to pixels
}

# transformers keeps T5's feed-forward output Linears ("wo") unquantized for bitsandbytes and Quanto
# (T5EncoderModel._keep_in_fp32_modules); torchao quantizes them. Measured: 1.0e9 parameters in 16 bits.
T5_UNQUANTIZED = ("wo",)


def _linear_bytes(out_features: int, in_features: int, scheme: str) -> float:
    """Bytes of one Linear weight of shape (out, in) stored in `scheme`, scales included."""
    n = out_features * in_features
    if scheme == "16bit":
        return 2 * n
    if scheme == "int8-row":  # int8 or float8 weights and a scale per output row (4 bytes: within 0.1% either way)
        return n + 4 * out_features
    if scheme == "nf4":  # two 4-bit values per byte, an fp32 absmax per 64 values
        return n / 2 + 4 * n / 64
    if scheme == "nf4-double":  # the absmax quantized to 8 bits, with an fp32 scale per 256 of them
        return n / 2 + n / 64 + 4 * n / (64 * 256)
    if scheme == "int4-g128":  # 4-bit values, a 16-bit scale and zero point per 128 (torchao, Quanto)
        return n / 2 + 4 * n / 128
    if scheme == "uint4-g64":  # 4-bit values, a float32 scale and zero point per 64 (SDNQ)
        return n / 2 + 8 * n / 64
    if scheme == "int2-g128":
        return n / 4 + 4 * n / 128
    if scheme == "fp8-storage":  # fp8 layerwise casting: one byte, no scale
        return n
    raise ValueError(f"Unknown storage scheme {scheme!r}.")


def _module_bytes(module: torch.nn.Module, scheme: str, skip: tuple[str, ...] = ()) -> float:
    total = 0.0
    counted: set[int] = set()
    for name, sub in module.named_modules():
        if isinstance(sub, torch.nn.Linear) and not any(part in name.split(".") for part in skip):
            total += _linear_bytes(sub.out_features, sub.in_features, scheme)
            counted.add(id(sub.weight))
    return total + sum(2 * p.numel() for p in module.parameters() if id(p) not in counted)


def _gguf_transformer_bytes(transformer: torch.nn.Module, gguf_type: str) -> float:
    import gguf

    from . import gguf as ql_gguf

    shapes = {name: tuple(p.shape) for name, p in transformer.state_dict().items()}
    total = 0.0
    for tensor in ql_gguf.plan_tensors(shapes, gguf_type):
        numel = 1
        for size in tensor.shape:
            numel *= size
        if tensor.gguf_type in ("F32", "F16", "BF16"):
            total += 2 * numel  # diffusers holds the float tensors in the compute dtype
        else:
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[tensor.gguf_type]]
            total += numel / block * type_size
    return total


@functools.lru_cache(maxsize=4)
def meta_components(model: str) -> dict[str, torch.nn.Module]:
    """The model's four components on the meta device (shapes, no weights), built once per model. Chapter 07."""
    return {name: models.meta_component(model, name) for name in models.MODEL_COMPONENTS}


def weights_bytes(model: str | None, recipe: str | recipes.Recipe) -> dict[str, int]:
    """Bytes of each component's weights as `recipe` stores them, predicted from `model`'s config alone. Chapter 07."""
    from . import memory

    recipe = recipes.get_recipe(recipe)
    metas = meta_components(models.get_model(model).name)
    result = {name: sum(2 * p.numel() for p in meta.parameters()) for name, meta in metas.items()}
    transformer_scheme, t5_scheme = recipe.storage
    if recipe.gguf_type:
        result["transformer"] = _gguf_transformer_bytes(metas["transformer"], recipe.gguf_type)
    elif recipe.layerwise_storage_dtype is not None:
        plan_rows = memory.layerwise_casting_plan(metas["transformer"])
        result["transformer"] = sum(row["params"] * (1 if row["cast"] else 2) for row in plan_rows)
    elif transformer_scheme != "16bit":  # diffusers' ModelOpt config leaves every proj_out unquantized (chapter 08)
        skip = ("proj_out",) if recipe.backend == "modelopt" else ()
        result["transformer"] = _module_bytes(metas["transformer"], transformer_scheme, skip)
    if t5_scheme != "16bit":
        skip = T5_UNQUANTIZED if recipe.backend in ("bitsandbytes", "quanto") else ()
        result["text_encoder_2"] = _module_bytes(metas["text_encoder_2"], t5_scheme, skip)
    return {name: int(round(value)) for name, value in result.items()}


def pixel_scale(height: int, width: int) -> float:
    """How activations scale with the image: its pixel count over 1024×1024's. Chapter 07."""
    return height * width / (1024 * 1024)


def predict_peak_gpu_gib(model: str | None, recipe: str | recipes.Recipe, height: int = 1024,
                         width: int = 1024) -> float:
    """Peak GPU memory (reserved, GiB) while generating one `height`×`width` image with `recipe`. Chapter 07."""
    recipe = recipes.get_recipe(recipe)
    parts = {name: value / GIB for name, value in weights_bytes(model, recipe).items()}
    scale = pixel_scale(height, width)
    act = {name: value * scale for name, value in ACTIVATIONS_1024_GIB.items()}
    if recipe.device_map is not None:
        raise ValueError(f"Recipe {recipe.name!r} spreads the pipeline over several GPUs; plan one GPU at a time.")
    if recipe.offload is None:
        return sum(parts.values()) + act["all-on-gpu"]
    if recipe.offload == "model" and recipe.name.startswith("bnb-8bit"):
        raise ValueError(f"The planner does not model {recipe.name!r}: model offloading leaves bitsandbytes' "
                         "int8 weights on the GPU (measured: 14.5 GiB after loading, 27.5 GiB peak; results/"
                         "07_compare_flux-dev-shaped.json).")
    if recipe.offload == "model":  # one component on the GPU at a time
        return max(parts["transformer"] + act["transformer"], parts["text_encoder_2"] + act["text_encoder_2"],
                   parts["vae"] + act["vae"], parts["text_encoder"])
    if recipe.offload == "sequential":  # one layer at a time: the VAE decode's activations dominate
        return act["vae"] + act["text_encoder_2"]
    raise ValueError(f"The planner does not model {recipe.offload!r} offloading yet; chapter 05 has its "
                     "measured peaks (results/05_memory_flux-dev-shaped.json).")


@dataclass
class FitPlan:
    """Whether `recipe` fits a GPU, what it is predicted to need, and what would fit instead. Chapter 07."""

    model: str
    recipe: str
    height: int
    width: int
    gpu_mem_gib: float
    weights_gib: dict[str, float]
    peak_gpu_gib: float
    fits: bool
    reason: str
    instead: list[tuple[str, float]] = field(default_factory=list)  # (recipe, predicted peak GiB)

    def __str__(self) -> str:
        lines = [f"{self.recipe} on {self.model} at {self.height}×{self.width}: predicted peak "
                 f"{self.peak_gpu_gib:.1f} GiB of {self.gpu_mem_gib:g} GiB. {self.reason}"]
        if not self.fits and self.instead:
            lines.append("These would fit: " + ", ".join(f"{name} ({peak:.1f} GiB)" for name, peak in self.instead))
        return "\n".join(lines)


# Recipes the planner suggests in place of one that does not fit, in the order tried.
_ALTERNATIVES = ("bf16", "fp8-layerwise-e4m3", "bnb-8bit", "torchao-int8wo", "quanto-int8", "gguf-q8_0",
                 "gguf-q4_1", "bnb-4bit-nf4", "gguf-q2_k", "bf16+model-offload", "bnb-4bit-nf4+model-offload",
                 "gguf-q2_k+model-offload", "bf16+sequential-offload")


def plan(model: str | None, recipe: str, gpu: str | float = "T4", height: int = 1024, width: int = 1024,
         margin_gib: float = 0.5, count: int = 3) -> FitPlan:
    """Predict `recipe`'s peak GPU memory on `gpu` (a name from `env.GPUS`, or GiB) and say whether it fits.

    A recipe fits when its predicted peak plus `margin_gib` is within the GPU's memory and the GPU has
    the kernels it needs; when it does not, `instead` lists up to `count` recipes that would. A GPU
    given only by its memory is taken to compute what an H100 does (compute capability 9.0). Chapter 07.
    """
    spec = models.get_model(model)
    recipe_obj = recipes.get_recipe(recipe)
    if isinstance(gpu, str):
        if gpu not in env.GPUS:
            raise ValueError(f"Unknown GPU {gpu!r}. Known GPUs: {', '.join(env.GPUS)}; or pass its memory in GiB.")
        gpu_mem, cc = env.GPUS[gpu].memory_gib, env.GPUS[gpu].compute_capability
    else:
        gpu_mem, cc = float(gpu), (9, 0)
    device = env.describe_gpu(str(gpu), cc, gpu_mem)

    peak = predict_peak_gpu_gib(spec.name, recipe_obj, height, width)
    weights = {name: value / GIB for name, value in weights_bytes(spec.name, recipe_obj).items()}
    cannot = recipes.why_not_here(recipe_obj, device, packages=False)
    if cannot:
        fits, reason = False, cannot
    elif peak + margin_gib > gpu_mem:
        fits, reason = False, f"It does not fit: {peak + margin_gib:.1f} GiB with a {margin_gib} GiB margin."
    else:
        fits, reason = True, f"It fits, with {gpu_mem - peak:.1f} GiB to spare."
    instead = []
    if not fits:
        for name in _ALTERNATIVES:
            if name == recipe_obj.name or recipes.why_not_here(name, device, packages=False):
                continue
            other = predict_peak_gpu_gib(spec.name, name, height, width)
            if other + margin_gib <= gpu_mem:
                instead.append((name, other))
            if len(instead) == count:
                break
    return FitPlan(spec.name, recipe_obj.name, height, width, gpu_mem, weights, peak, fits, reason, instead)
