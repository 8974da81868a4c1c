"""What the low-RAM scripts need on a free Colab T4, predicted from the model's config (the lab's T4 planner).

For the low-RAM recipes (whole scripts for a Colab T4: fp16, 15 GiB, about 12 GiB of host RAM),
`predict_colab_peak_gpu_gib` gives the allocated peak of each stage, `predict_peak_host_gib` the host RAM
(RssAnon, and VmRSS, which also counts the checkpoint pages a loader maps), and `plan_colab` the verdict; their
constants were measured once on the simulated T4 (results/09_colab_t4_sim_flux-dev-shaped.json). `t4_estimate`
says roughly how long a T4 takes per step. The Colab generator and the simulated T4 use them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import env, models, recipes
from ..env import GIB, T4_USABLE_GIB
from ..plan import ACTIVATIONS_1024_GIB, T5_UNQUANTIZED, meta_components, pixel_scale, weights_bytes

__all__ = ["HOST_GIB", "colab_weights_bytes", "predict_colab_peak_gpu_gib", "predict_host_stages_gib",
           "predict_peak_host_gib", "ColabPlan", "plan_colab", "T4Estimate", "t4_estimate"]


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

def _colab_recipe(recipe) -> recipes.Recipe:
    recipe = recipes.get_recipe(recipe)
    if recipe.low_ram is None:
        raise ValueError(f"Recipe {recipe.name!r} is not a low-RAM script. Those are: "
                         f"{', '.join(n for n, r in recipes.RECIPES.items() if r.low_ram)}.")
    return recipe


def _t5_wo_params(model: str) -> int:
    return sum(m.weight.numel() for name, m in models.linear_layers(meta_components(model)["text_encoder_2"]).items()
               if name.split(".")[-1] in T5_UNQUANTIZED)


def colab_weights_bytes(model: str | None, recipe) -> dict[str, int]:
    """Bytes of each component's weights as low-RAM recipe `recipe` holds them in fp16, from the config alone.

    In fp16, transformers keeps T5's feed-forward output Linears ("wo") in fp32, quantized or not.
    """
    recipe = _colab_recipe(recipe)
    result = weights_bytes(models.get_model(model).name, recipe)
    result["text_encoder_2"] += 2 * _t5_wo_params(models.get_model(model).name)
    return result


def predict_colab_peak_gpu_gib(model: str | None, recipe, height: int = 1024, width: int = 1024) -> dict[str, float]:
    """Peak GPU memory allocated (GiB) in each stage of Colab recipe `recipe`, in fp16, and "peak", the largest.

    With encode-then-free recipes the text encoders and the transformer are never on the GPU together.
    """
    recipe = _colab_recipe(recipe)
    parts = {name: value / GIB for name, value in colab_weights_bytes(model, recipe).items()}
    scale = pixel_scale(height, width)
    text = parts["text_encoder"] + parts["text_encoder_2"]
    resident = parts["transformer"] + parts["vae"] + (0 if recipe.low_ram.encode_then_free else text)
    stages = {
        "denoise": resident + COLAB_DENOISE_1024_GIB * scale,
        "decode": resident + ACTIVATIONS_1024_GIB["vae"] * scale,
    }
    stages = ({"encode": text + ACTIVATIONS_1024_GIB["text_encoder_2"], **stages} if recipe.low_ram.encode_then_free
              else stages)
    return {**stages, "peak": max(stages.values())}


def _mapped_gib(model: str, recipe) -> dict[str, float]:
    """The checkpoint pages mapped at once while each loading stage runs (GiB), as VmRSS counts them."""
    spec = models.get_model(model)
    component = {name: value / GIB for name, value in weights_bytes(spec.name, "bf16").items()}  # bf16 files
    shard = _LARGEST_SHARD_BYTES["hub" if spec.source == "hub" else "embedded"] / GIB
    # transformers keeps every file of CLIP or T5 mapped until that component has loaded; diffusers maps
    # the transformer and the VAE one shard at a time
    text = max(component["text_encoder"], component["text_encoder_2"])
    if recipe.low_ram.prequantized:
        transformer = weights_bytes(spec.name, "bnb-4bit-nf4")["transformer"] / GIB  # save_pretrained's one file
    else:
        transformer = min(component["transformer"], shard)
    if recipe.low_ram.encode_then_free:
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
        if not recipe.low_ram.prequantized:
            raise ValueError(f"Low-RAM recipe {recipe.name!r} saves nothing; nf4-prequantized does.")
        written = weights_bytes(name, "bnb-4bit-nf4")["transformer"] / GIB
        return {"save": (base + written, base + written + libs)}
    loading = HOST_GIB["loading_anon"] + shift
    stages = {stage: (loading, loading + libs + mapped) for stage, mapped in _mapped_gib(name, recipe).items()}
    running = HOST_GIB["running_anon"] + shift
    return {**stages, "generate": (running, running + libs)}


def predict_peak_host_gib(model: str | None, recipe, *, rss: bool = False, device: str = "cuda",
                          save: bool = False, base_anon_gib: float | None = None) -> float:
    """Peak host RAM (GiB) of low-RAM recipe `recipe` on `model`: RssAnon, what runs a Colab runtime out of
    memory, or with `rss=True` VmRSS, which also counts checkpoint pages the kernel may drop."""
    stages = predict_host_stages_gib(model, recipe, device=device, save=save, base_anon_gib=base_anon_gib)
    return max(rss_gib if rss else anon for anon, rss_gib in stages.values())


@dataclass
class ColabPlan:
    """Whether a low-RAM recipe fits a GPU and a host: predicted peaks, the verdict, and what would fit instead."""

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
    instead: list[tuple[str, int]] = field(default_factory=list)  # (low-RAM recipe, square size)

    def __str__(self) -> str:
        lines = [f"{self.recipe} on {self.model} at {self.height}×{self.width}: predicted {self.peak_gpu_gib:.1f} "
                 f"GiB of GPU memory (of {self.gpu_mem_gib:g}) and {self.peak_host_anon_gib:.1f} GiB of host RAM "
                 f"(of {self.host_mem_gib:g}; VmRSS {self.peak_host_rss_gib:.1f}). {self.reason}"]
        if not self.fits and self.instead:
            lines.append("These would fit: " + ", ".join(f"{name} at {size}×{size}" for name, size in self.instead))
        return "\n".join(lines)


def plan_colab(model: str | None, recipe, gpu_mem_gib: float = T4_USABLE_GIB,
               host_mem_gib: float = env.COLAB_HOST_RAM_GIB, height: int = 1024, width: int = 1024) -> ColabPlan:
    """Predict low-RAM recipe `recipe`'s peaks on `model` and say whether it fits; if not, what would."""
    recipe = _colab_recipe(recipe)
    name = models.get_model(model).name

    def verdict(candidate, h, w):
        gpu = predict_colab_peak_gpu_gib(name, candidate, h, w)["peak"]
        anon = max(predict_peak_host_gib(name, candidate),
                   predict_peak_host_gib(name, candidate, save=True) if candidate.low_ram.prequantized else 0)
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
            for other in (r for r in recipes.RECIPES.values() if r.low_ram):
                if (other.name, size) != (recipe.name, height) and size <= height and verdict(other, size, size)[2]:
                    instead.append((other.name, size))
            if instead:
                break
    return ColabPlan(name, recipe.name, height, width, gpu_mem_gib, host_mem_gib, gpu, anon, rss, fits, reason,
                     instead)


# --- a T4's time per step, estimated ------------------------------------------------------------------------

# Bytes read and written per transformer Linear weight in one step. With many tokens (4,096 image + 512
# text at 1024x1024), bitsandbytes' 4-bit, torchao's int8 weight-only, Quanto's and GGUF's layers dequantize each
# weight to fp16 (read the packed weight, write 2 bytes) and cuBLAS reads the 2 bytes again. LLM.int8() reads its
# int8 weight once in an int8 matmul, and quantizes the activations (left out here).
def _bytes_per_weight(recipe: recipes.Recipe) -> float:
    scheme = recipe.storage[0]
    if recipe.backend == "bitsandbytes" and scheme == "int8-row":
        return 1.0
    packed = {"16bit": 2.0, "nf4": 0.5 + 4 / 64, "int8-row": 1.0 + 4 / 4096}
    if scheme == "16bit":
        return 2.0
    if recipe.gguf_type:
        import gguf

        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[recipe.gguf_type]]
        return type_size / block + 2 + 2
    return packed[scheme] + 2 + 2


# What fraction of the datasheet peaks a T4 reaches, assumed: cuBLAS fp16 GEMMs of FLUX's sizes on a T4
# held to 70 W, which lowers its clock under load; attention through PyTorch's memory-efficient kernel
# (flash attention needs compute capability 8.0); streaming copies at 70% of the GDDR6 bandwidth.
T4_ACHIEVED = {"linear": 0.40, "attention": 0.25, "bandwidth": 0.70}


@dataclass(frozen=True)
class T4Estimate:
    """What one denoising step would take on a T4: an estimate from FLOPs and bytes, not a measurement."""

    recipe: str
    height: int
    width: int
    linear_tflop: float
    attention_tflop: float
    weight_gb_moved: float
    compute_s: float
    memory_s: float
    s_per_step: float  # compute_s + memory_s: dequantizing and multiplying are separate kernels, in turn
    floor_s_per_step: float  # the same at 100% of every peak
    assumptions: str

    def __str__(self) -> str:
        return (f"{self.recipe} at {self.height}x{self.width} on a T4, estimated: {self.s_per_step:.1f} s per step "
                f"({self.compute_s:.2f} s of matmuls and attention, {self.memory_s:.2f} s moving "
                f"{self.weight_gb_moved:.0f} GB of weights; at the datasheet peaks {self.floor_s_per_step:.2f} s). "
                f"{self.assumptions}")


def t4_estimate(recipe="nf4-encode-then-free", height: int = 1024, width: int = 1024, model: str = "flux-dev-shaped",
                text_tokens: int = 512, achieved: dict[str, float] | None = None) -> T4Estimate:
    """Estimate a T4's time per denoising step for `recipe` from FLOPs and bytes moved (see `T4_ACHIEVED`)."""
    from .. import speed

    recipe = recipes.get_recipe(recipe)
    t4 = env.GPUS["T4"]
    achieved = {**T4_ACHIEVED, **(achieved or {})}
    transformer = models.meta_component(model, "transformer")
    tflop = speed.transformer_tflop_per_step(transformer, height, width, text_tokens)
    linear_params = sum(m.weight.numel() for m in models.linear_layers(transformer).values())
    other_params = sum(p.numel() for p in transformer.parameters()) - linear_params
    per_weight = _bytes_per_weight(recipe)
    gb_moved = (linear_params * per_weight + other_params * 2) / 1e9
    compute_peak_s = (tflop["linear_tflop"] + tflop["attention_tflop"]) / t4.fp16_tflops
    compute_s = (tflop["linear_tflop"] / (t4.fp16_tflops * achieved["linear"])
                 + tflop["attention_tflop"] / (t4.fp16_tflops * achieved["attention"]))
    memory_s = gb_moved / (t4.bandwidth_gb_s * achieved["bandwidth"])
    int8 = recipe.backend == "bitsandbytes" and recipe.storage[0] == "int8-row"
    assumptions = (f"Assumed: fp16 matmuls at {achieved['linear']:.0%} of the T4's {t4.fp16_tflops:g} TFLOP/s, "
                   f"attention at {achieved['attention']:.0%}, weights streamed at {achieved['bandwidth']:.0%} of "
                   f"{t4.bandwidth_gb_s:g} GB/s, {per_weight:.2f} bytes moved per Linear weight; activations' "
                   "traffic, kernel launches and the VAE are left out."
                   + (" LLM.int8()'s activation quantization and outlier columns are left out too: on the simulated "
                      "T4 it took 2.2 times NF4's time per step (results/09)." if int8 else ""))
    return T4Estimate(recipe.name, height, width, tflop["linear_tflop"], tflop["attention_tflop"], gb_moved,
                      compute_s, memory_s, compute_s + memory_s,
                      compute_peak_s + gb_moved / t4.bandwidth_gb_s, assumptions)
