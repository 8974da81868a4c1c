"""The fit planner: before anything is downloaded, predict what a recipe needs from the model's config.

`weights_bytes` counts each component's weights as a recipe stores them, from the parameter shapes of
a meta model (no weights): Linear weights at the recipe's bits plus its scales, the rest in 16 bits.
`predict_peak_gpu_gib` adds what is on the GPU at once (everything, the largest component with model
offload, or one layer with sequential offload) and the activations of generating, whose sizes were
measured once on a bf16 run at 1024×1024 (`ACTIVATIONS_1024_GIB`) and scale with the pixel count.
`plan` says whether a recipe fits a GPU, and which recipes would.

For the Colab recipes of `lowram` (fp16, a T4 and about 12 GiB of host RAM), `predict_colab_peak_gpu_gib`
gives the allocated peak of each stage, `predict_peak_host_gib` the host RAM (RssAnon, and VmRSS, which also
counts the checkpoint pages a loader maps), and `plan_colab` the verdict; their constants were measured once on
the simulated T4 (results/09_colab_t4_sim_flux-dev-shaped.json).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from . import env, models, recipes

__all__ = [
    "ACTIVATIONS_1024_GIB",
    "GPUS",
    "weights_bytes",
    "predict_peak_gpu_gib",
    "FitPlan",
    "plan",
    "T4_USABLE_GIB",
    "HOST_GIB",
    "colab_weights_bytes",
    "predict_colab_peak_gpu_gib",
    "predict_host_stages_gib",
    "predict_peak_host_gib",
    "ColabPlan",
    "plan_colab",
]

GIB = 1024**3

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

# The GPUs the course meets: memory in GiB and compute capability.
GPUS = {
    "T4": (15.0, (7, 5)),
    "L4": (22.0, (8, 9)),
    "A100-40GB": (39.4, (8, 0)),
    "RTX 4090": (24.0, (8, 9)),
    "H100": (79.2, (9, 0)),
}

# transformers keeps T5's feed-forward output Linears ("wo") unquantized for bitsandbytes and Quanto
# (T5EncoderModel._keep_in_fp32_modules); torchao quantizes them. Measured: 1.0e9 parameters in 16 bits.
_T5_UNQUANTIZED = ("wo",)


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
    if scheme == "int2-g128":
        return n / 4 + 4 * n / 128
    if scheme == "fp8-storage":  # fp8 layerwise casting: one byte, no scale
        return n
    raise ValueError(f"Unknown storage scheme {scheme!r}.")


_SCHEMES = {  # recipe name (before any +offload) -> (transformer scheme, T5 scheme)
    "bf16": ("16bit", "16bit"),
    "bnb-8bit": ("int8-row", "int8-row"),
    "bnb-4bit-fp4": ("nf4", "nf4"),
    "bnb-4bit-nf4": ("nf4", "nf4"),
    "bnb-4bit-nf4-fp32-compute": ("nf4", "nf4"),
    "bnb-4bit-nf4-double": ("nf4-double", "nf4-double"),
    "torchao-int8wo": ("int8-row", "int8-row"),
    "torchao-int8dq": ("int8-row", "int8-row"),
    "torchao-float8wo": ("int8-row", "int8-row"),
    "torchao-float8dq-row": ("int8-row", "int8-row"),
    "torchao-float8dq-tensor": ("int8-row", "int8-row"),
    "torchao-int4wo": ("int4-g128", "int4-g128"),
    "quanto-int8": ("int8-row", "int8-row"),
    "quanto-float8": ("int8-row", "int8-row"),
    "quanto-int4": ("int4-g128", "int4-g128"),
    "quanto-int2": ("int2-g128", "int2-g128"),
}


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
def _meta_components(model: str) -> dict[str, torch.nn.Module]:
    """The model's four components on the meta device (shapes, no weights), built once per model."""
    return {name: models.meta_component(model, name) for name in models.MODEL_COMPONENTS}


def weights_bytes(model: str | None, recipe: str | recipes.Recipe) -> dict[str, int]:
    """Bytes of each component's weights as `recipe` stores them, predicted from `model`'s config alone."""
    from . import memory

    recipe = recipes.get_recipe(recipe)
    base = recipe.name.split("+")[0]
    metas = _meta_components(models.get_model(model).name)
    result = {name: sum(2 * p.numel() for p in meta.parameters()) for name, meta in metas.items()}
    if recipe.gguf_type:
        result["transformer"] = _gguf_transformer_bytes(metas["transformer"], recipe.gguf_type)
    elif recipe.layerwise_storage_dtype is not None:
        plan_rows = memory.layerwise_casting_plan(metas["transformer"])
        result["transformer"] = sum(row["params"] * (1 if row["cast"] else 2) for row in plan_rows)
    elif base in _SCHEMES:
        transformer_scheme, t5_scheme = _SCHEMES[base]
        result["transformer"] = _module_bytes(metas["transformer"], transformer_scheme)
        skip = _T5_UNQUANTIZED if recipe.backend in ("bitsandbytes", "quanto") else ()
        result["text_encoder_2"] = _module_bytes(metas["text_encoder_2"], t5_scheme, skip)
    else:
        raise ValueError(f"The planner does not know how recipe {recipe.name!r} stores its weights.")
    return {name: int(round(value)) for name, value in result.items()}


def _pixel_scale(height: int, width: int) -> float:
    return height * width / (1024 * 1024)


def predict_peak_gpu_gib(model: str | None, recipe: str | recipes.Recipe, height: int = 1024,
                         width: int = 1024) -> float:
    """Peak GPU memory (reserved, GiB) while generating one `height`×`width` image with `recipe`."""
    recipe = recipes.get_recipe(recipe)
    parts = {name: value / GIB for name, value in weights_bytes(model, recipe).items()}
    scale = _pixel_scale(height, width)
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
    """Whether `recipe` fits a GPU, what it is predicted to need, and what would fit instead."""

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
    """Predict `recipe`'s peak GPU memory on `gpu` (a name from `GPUS`, or GiB) and say whether it fits.

    A recipe fits when its predicted peak plus `margin_gib` is within the GPU's memory and the GPU has
    the kernels it needs; when it does not, `instead` lists up to `count` recipes that would. A GPU
    given only by its memory is taken to compute what an H100 does (compute capability 9.0).
    """
    spec = models.get_model(model)
    recipe_obj = recipes.get_recipe(recipe)
    if isinstance(gpu, str):
        if gpu not in GPUS:
            raise ValueError(f"Unknown GPU {gpu!r}. Known GPUs: {', '.join(GPUS)}; or pass its memory in GiB.")
        gpu_mem, cc = GPUS[gpu]
    else:
        gpu_mem, cc = float(gpu), (9, 0)
    device = env.describe_gpu(str(gpu), cc, gpu_mem)

    peak = predict_peak_gpu_gib(spec.name, recipe_obj, height, width)
    weights = {name: value / GIB for name, value in weights_bytes(spec.name, recipe_obj).items()}
    cannot = recipes.why_not_here(recipe_obj, device)
    if cannot:
        fits, reason = False, cannot
    elif peak + margin_gib > gpu_mem:
        fits, reason = False, f"It does not fit: {peak + margin_gib:.1f} GiB with a {margin_gib} GiB margin."
    else:
        fits, reason = True, f"It fits, with {gpu_mem - peak:.1f} GiB to spare."
    instead = []
    if not fits:
        for name in _ALTERNATIVES:
            if name == recipe_obj.name or recipes.why_not_here(name, device):
                continue
            other = predict_peak_gpu_gib(spec.name, name, height, width)
            if other + margin_gib <= gpu_mem:
                instead.append((name, other))
            if len(instead) == count:
                break
    return FitPlan(spec.name, recipe_obj.name, height, width, gpu_mem, weights, peak, fits, reason, instead)


# --- The Colab recipes (quantlab.lowram): GPU memory in fp16, and host RAM ------------------------------

# What a T4 leaves PyTorch: 14.75 GiB of total capacity less about 0.5 GiB of CUDA context (assumed; the
# simulated T4 of results/09 was capped at 15 GiB, as the issue asks, and again at this figure).
T4_USABLE_GIB = 14.25
# Reserved memory above the allocated peak that a capped allocator still needed (results/09: 0.14-0.40 GiB).
COLAB_FRAGMENTATION_GIB = 0.5
# GPU memory allocated while generating, above the weights on the GPU, at 1024x1024 in fp16 (results/09, the
# largest of the five recipes): a denoising step, and the VAE decode (which ACTIVATIONS_1024_GIB["vae"] also gives).
COLAB_DENOISE_1024_GIB = 0.62

# Host memory of a process running a Colab recipe, measured on the simulated T4 (results/09; device "cuda").
HOST_GIB = {
    "base_anon": 0.53,  # RssAnon: Python with torch, diffusers and transformers imported, CUDA up (0.528-0.530)
    "loading_anon": 1.2,  # RssAnon while components load straight to the GPU (1.12-1.33)
    "running_anon": 1.48,  # RssAnon once it has generated: CUDA libraries and their workspaces (1.39-1.48)
    "library_pages": 0.47,  # VmRSS that is neither anonymous nor a checkpoint: shared libraries (0.40-0.54)
}

# The largest safetensors file a loader maps at once: embedded models are saved in 5 GB shards (models.py);
# the published FLUX.1 checkpoints use diffusers' 10 GB default (FLUX.1-dev's transformer: 9.98, 9.95, 3.87 GB).
_LARGEST_SHARD_BYTES = {"embedded": 5e9, "hub": 9.98e9}

_COLAB_TRANSFORMER_RECIPE = {"nf4": "bnb-4bit-nf4", "int8": "bnb-8bit", "int8wo": "torchao-int8wo"}


def _colab_recipe(recipe):
    from . import lowram

    return lowram.get_colab_recipe(recipe)


def _t5_wo_params(model: str) -> int:
    return sum(m.weight.numel() for name, m in models.linear_layers(_meta_components(model)["text_encoder_2"]).items()
               if name.split(".")[-1] in _T5_UNQUANTIZED)


def colab_weights_bytes(model: str | None, recipe) -> dict[str, int]:
    """Bytes of each component's weights as Colab recipe `recipe` holds them in fp16, from the config alone.

    In fp16, transformers keeps T5's feed-forward output Linears ("wo") in fp32, quantized or not.
    """
    recipe = _colab_recipe(recipe)
    name = models.get_model(model).name
    result = dict(weights_bytes(name, "bf16"))
    result["transformer"] = weights_bytes(name, _COLAB_TRANSFORMER_RECIPE[recipe.transformer_weights])["transformer"]
    if recipe.text_encoder_2_weights == "nf4":
        result["text_encoder_2"] = weights_bytes(name, "bnb-4bit-nf4")["text_encoder_2"]
    result["text_encoder_2"] += 2 * _t5_wo_params(name)
    return result


def predict_colab_peak_gpu_gib(model: str | None, recipe, height: int = 1024, width: int = 1024) -> dict[str, float]:
    """Peak GPU memory allocated (GiB) in each stage of Colab recipe `recipe`, in fp16, and "peak", the largest.

    With encode-then-free recipes the text encoders and the transformer are never on the GPU together.
    """
    recipe = _colab_recipe(recipe)
    parts = {name: value / GIB for name, value in colab_weights_bytes(model, recipe).items()}
    scale = _pixel_scale(height, width)
    text = parts["text_encoder"] + parts["text_encoder_2"]
    resident = parts["transformer"] + parts["vae"] + (0 if recipe.encode_then_free else text)
    stages = {
        "denoise": resident + COLAB_DENOISE_1024_GIB * scale,
        "decode": resident + ACTIVATIONS_1024_GIB["vae"] * scale,
    }
    stages = {"encode": text + ACTIVATIONS_1024_GIB["text_encoder_2"], **stages} if recipe.encode_then_free else stages
    return {**stages, "peak": max(stages.values())}


def _mapped_gib(model: str, recipe) -> dict[str, float]:
    """The checkpoint pages mapped at once while each loading stage runs (GiB), as VmRSS counts them."""
    spec = models.get_model(model)
    component = {name: value / GIB for name, value in weights_bytes(spec.name, "bf16").items()}  # bf16 files
    shard = _LARGEST_SHARD_BYTES["hub" if spec.source == "hub" else "embedded"] / GIB
    # transformers keeps every file of CLIP or T5 mapped until that component has loaded; diffusers maps
    # the transformer and the VAE one shard at a time
    text = max(component["text_encoder"], component["text_encoder_2"])
    if recipe.prequantized:
        transformer = weights_bytes(spec.name, "bnb-4bit-nf4")["transformer"] / GIB  # save_pretrained's one file
    else:
        transformer = min(component["transformer"], shard)
    if recipe.encode_then_free:
        return {"encode": text, "load_transformer": max(transformer, component["vae"])}
    return {"load": max(text, transformer, component["vae"])}


def predict_host_stages_gib(model: str | None, recipe, *, device: str = "cuda", save: bool = False,
                            base_anon_gib: float | None = None) -> dict[str, tuple[float, float]]:
    """(RssAnon, VmRSS) in GiB for each stage of Colab recipe `recipe` on a GPU; the saving step alone with
    `save=True`.

    Every weight goes straight to the GPU, so RssAnon stays at what the libraries take, except while
    `save_pretrained` writes: safetensors copies a whole shard (here the one NF4 file) to host RAM first.
    VmRSS adds the checkpoint pages a loader has mapped. `base_anon_gib` replaces the measured baseline
    (`HOST_GIB["base_anon"]`), for a machine whose libraries take more or less.
    """
    recipe = _colab_recipe(recipe)
    name = models.get_model(model).name
    libs = HOST_GIB["library_pages"]
    if not device.startswith("cuda"):
        raise ValueError(f"The host-RAM planner models a GPU run (device='cuda'), where the weights go straight to "
                         f"the GPU; on {device!r} the weights themselves are in host RAM: see weights_bytes.")
    base = HOST_GIB["base_anon"] if base_anon_gib is None else base_anon_gib
    shift = base - HOST_GIB["base_anon"]
    if save:
        if not recipe.prequantized:
            raise ValueError(f"Colab recipe {recipe.name!r} saves nothing; nf4-prequantized does.")
        written = weights_bytes(name, "bnb-4bit-nf4")["transformer"] / GIB
        return {"save": (base + written, base + written + libs)}
    loading = HOST_GIB["loading_anon"] + shift
    stages = {stage: (loading, loading + libs + mapped) for stage, mapped in _mapped_gib(name, recipe).items()}
    running = HOST_GIB["running_anon"] + shift
    return {**stages, "generate": (running, running + libs)}


def predict_peak_host_gib(model: str | None, recipe, *, rss: bool = False, device: str = "cuda",
                          save: bool = False, base_anon_gib: float | None = None) -> float:
    """Peak host RAM (GiB) of Colab recipe `recipe` on `model`: RssAnon, what runs a Colab runtime out of
    memory, or with `rss=True` VmRSS, which also counts checkpoint pages the kernel may drop."""
    stages = predict_host_stages_gib(model, recipe, device=device, save=save, base_anon_gib=base_anon_gib)
    return max(rss_gib if rss else anon for anon, rss_gib in stages.values())


@dataclass
class ColabPlan:
    """Whether a Colab recipe fits a GPU and a host: predicted peaks, the verdict, and what would fit instead."""

    model: str
    recipe: str
    height: int
    width: int
    gpu_mem_gib: float
    host_mem_gib: float
    peak_gpu_gib: float  # allocated; it fits when this plus COLAB_FRAGMENTATION_GIB is within gpu_mem_gib
    peak_host_anon_gib: float
    peak_host_rss_gib: float
    fits: bool
    reason: str
    instead: list[tuple[str, int]] = field(default_factory=list)  # (Colab recipe, square size)

    def __str__(self) -> str:
        lines = [f"{self.recipe} on {self.model} at {self.height}×{self.width}: predicted {self.peak_gpu_gib:.1f} "
                 f"GiB of GPU memory (of {self.gpu_mem_gib:g}) and {self.peak_host_anon_gib:.1f} GiB of host RAM "
                 f"(of {self.host_mem_gib:g}; VmRSS {self.peak_host_rss_gib:.1f}). {self.reason}"]
        if not self.fits and self.instead:
            lines.append("These would fit: " + ", ".join(f"{name} at {size}×{size}" for name, size in self.instead))
        return "\n".join(lines)


def plan_colab(model: str | None, recipe, gpu_mem_gib: float = T4_USABLE_GIB, host_mem_gib: float = 12.0,
               height: int = 1024, width: int = 1024) -> ColabPlan:
    """Predict Colab recipe `recipe`'s peaks on `model` and say whether it fits; if not, what would."""
    from . import lowram

    recipe = _colab_recipe(recipe)
    name = models.get_model(model).name

    def verdict(candidate, h, w):
        gpu = predict_colab_peak_gpu_gib(name, candidate, h, w)["peak"]
        anon = max(predict_peak_host_gib(name, candidate),
                   predict_peak_host_gib(name, candidate, save=True) if candidate.prequantized else 0)
        return gpu, anon, gpu + COLAB_FRAGMENTATION_GIB <= gpu_mem_gib and anon <= host_mem_gib

    gpu, anon, fits = verdict(recipe, height, width)
    rss = predict_peak_host_gib(name, recipe, rss=True)
    if fits:
        reason = f"It fits, with {gpu_mem_gib - gpu - COLAB_FRAGMENTATION_GIB:.1f} GiB of GPU memory to spare."
    elif anon > host_mem_gib:
        reason = f"It does not fit: {anon:.1f} GiB of host RAM."
    else:
        reason = (f"It does not fit: {gpu + COLAB_FRAGMENTATION_GIB:.1f} GiB of GPU memory with "
                  f"{COLAB_FRAGMENTATION_GIB} GiB for fragmentation.")
    instead = []
    if not fits:
        for size in (height, 768, 512):
            for other in lowram.COLAB_RECIPES.values():
                if (other.name, size) != (recipe.name, height) and size <= height and verdict(other, size, size)[2]:
                    instead.append((other.name, size))
            if instead:
                break
    return ColabPlan(name, recipe.name, height, width, gpu_mem_gib, host_mem_gib, gpu, anon, rss, fits, reason,
                     instead)
