"""One registry of named recipes: every quantization and offloading configuration the course teaches.

A recipe produces the real library objects (`BitsAndBytesConfig`, `TorchAoConfig`,
`QuantoConfig`, `GGUFQuantizationConfig`, `PipelineQuantizationConfig`), so a notebook can show
exactly what `load_pipeline` passes to diffusers. Before anything is loaded, `check_runs_here`
compares the recipe's needs with the device and says what to use instead.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from . import env, models
from . import gguf as ql_gguf

__all__ = [
    "Recipe",
    "Requirements",
    "UnsupportedHardwareError",
    "RECIPES",
    "OFFLOAD_MODES",
    "GGUF_TYPES",
    "list_recipes",
    "get_recipe",
    "check_runs_here",
    "why_not_here",
    "load_pipeline",
    "place_pipeline",
]


class UnsupportedHardwareError(RuntimeError):
    """A recipe needs something this device lacks (a CUDA GPU, bf16, fp8, ...)."""


@dataclass(frozen=True)
class Requirements:
    """What a recipe needs from the device, why, and what to use where it is missing."""

    cuda: bool = False
    min_compute_capability: tuple[int, int] | None = None
    why: str = ""
    instead: str = ""


# How a pipeline is placed on the device. None means `pipe.to(device)`.
OFFLOAD_MODES = ("model", "sequential", "group-block", "group-leaf", "group-leaf-stream")

# The GGUF types of the gguf-* recipes: those diffusers loads and chapter 02 writes.
GGUF_TYPES = ql_gguf.GGUF_TYPES

ConfigFactory = Callable[[torch.dtype], Any]


@dataclass(frozen=True)
class Recipe:
    """A named way to load FLUX: which components are quantized, how, and where they live."""

    name: str
    backend: str  # "none", "bitsandbytes", "torchao", "quanto", "gguf", "layerwise"
    description: str
    transformer: ConfigFactory | None = None  # dtype -> diffusers quantization config
    text_encoder_2: ConfigFactory | None = None  # dtype -> transformers quantization config
    layerwise_storage_dtype: torch.dtype | None = None
    gguf_type: str | None = None
    offload: str | None = None
    vae_tiling: bool = False  # decode the image tile by tile (`pipe.vae.enable_tiling()`)
    device_map: str | None = None  # "balanced": accelerate spreads the components over every GPU
    requires: Requirements = Requirements()

    def quantization_config(self, dtype: torch.dtype = torch.bfloat16):
        """The `PipelineQuantizationConfig` this recipe passes to `FluxPipeline.from_pretrained`, or None."""
        from diffusers import PipelineQuantizationConfig

        mapping = {}
        if self.transformer is not None:
            mapping["transformer"] = self.transformer(dtype)
        if self.text_encoder_2 is not None:
            mapping["text_encoder_2"] = self.text_encoder_2(dtype)
        return PipelineQuantizationConfig(quant_mapping=mapping) if mapping else None

    def gguf_config(self, dtype: torch.dtype = torch.bfloat16):
        """The `GGUFQuantizationConfig` for `from_single_file`, or None for non-GGUF recipes."""
        from diffusers import GGUFQuantizationConfig

        return GGUFQuantizationConfig(compute_dtype=dtype) if self.gguf_type else None


# --- bitsandbytes -----------------------------------------------------------------------------

_BNB_NEEDS = Requirements(
    cuda=True,
    why="diffusers 0.42 refuses bitsandbytes without a GPU ('No GPU found. A GPU is needed for quantization.')",
    instead="on a CPU, chapter 01 runs the same algorithms through bitsandbytes' Linear8bitLt and Linear4bit; "
    "or use a quanto-* or torchao-int8* recipe",
)


def _bnb(load_in_8bit: bool = False, quant_type: str | None = None, double_quant: bool = False,
         compute_dtype: torch.dtype | None = None) -> tuple[ConfigFactory, ConfigFactory]:
    def kwargs(dtype: torch.dtype) -> dict[str, Any]:
        if load_in_8bit:
            return {"load_in_8bit": True}
        return {
            "load_in_4bit": True,
            "bnb_4bit_quant_type": quant_type,
            "bnb_4bit_use_double_quant": double_quant,
            "bnb_4bit_compute_dtype": compute_dtype or dtype,
        }

    def transformer(dtype: torch.dtype):
        from diffusers import BitsAndBytesConfig

        return BitsAndBytesConfig(**kwargs(dtype))

    def text_encoder_2(dtype: torch.dtype):
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(**kwargs(dtype))

    return transformer, text_encoder_2


def _bnb_recipe(name: str, description: str, **kwargs) -> Recipe:
    transformer, text_encoder_2 = _bnb(**kwargs)
    return Recipe(name, "bitsandbytes", description, transformer, text_encoder_2, requires=_BNB_NEEDS)


# --- torchao ----------------------------------------------------------------------------------


def _torchao(make_config: Callable[[], Any]) -> tuple[ConfigFactory, ConfigFactory]:
    def transformer(dtype: torch.dtype):
        from diffusers import TorchAoConfig

        return TorchAoConfig(make_config())

    def text_encoder_2(dtype: torch.dtype):
        from transformers import TorchAoConfig

        return TorchAoConfig(make_config())

    return transformer, text_encoder_2


def _torchao_recipe(name: str, description: str, make_config: Callable[[], Any],
                    requires: Requirements = Requirements()) -> Recipe:
    transformer, text_encoder_2 = _torchao(make_config)
    return Recipe(name, "torchao", description, transformer, text_encoder_2, requires=requires)


def _int8_weight_only():
    from torchao.quantization import Int8WeightOnlyConfig

    return Int8WeightOnlyConfig()


def _int8_dynamic():
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    return Int8DynamicActivationInt8WeightConfig()


def _int4_weight_only():
    from torchao.quantization import Int4WeightOnlyConfig

    return Int4WeightOnlyConfig(group_size=128)


def _float8_weight_only():
    from torchao.quantization import Float8WeightOnlyConfig

    return Float8WeightOnlyConfig()


def _float8_dynamic(granularity: str) -> Callable[[], Any]:
    def make():
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor

        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow() if granularity == "row" else PerTensor())

    return make


_FP8_NEEDS = Requirements(
    cuda=True,
    min_compute_capability=env.FP8_MIN_CC,
    why="float8 matrix kernels need fp8 tensor cores (Ada or Hopper, compute capability 8.9+)",
    instead="torchao-int8wo or torchao-int8dq, or fp8-layerwise-e4m3 (which stores fp8 but computes in bf16/fp16)",
)
_INT4_NEEDS = Requirements(
    cuda=True,
    why="torchao's int4 weight-only kernels are CUDA kernels",
    instead="torchao-int8wo on a CPU, or quanto-int4",
)


# --- quanto -----------------------------------------------------------------------------------


def _quanto_recipe(weights: str) -> Recipe:
    def transformer(dtype: torch.dtype):
        from diffusers import QuantoConfig

        return QuantoConfig(weights_dtype=weights)

    def text_encoder_2(dtype: torch.dtype):
        from transformers import QuantoConfig

        return QuantoConfig(weights=weights)

    return Recipe(f"quanto-{weights}", "quanto", f"Quanto {weights} weights on transformer and T5",
                  transformer, text_encoder_2)


# --- the registry -----------------------------------------------------------------------------

_OFFLOAD_NEEDS = Requirements(
    cuda=True,
    why="offloading moves weights between host RAM and a GPU; on a CPU everything already lives in RAM",
    instead="the same recipe without offloading",
)


def _with_offload(recipe: Recipe, offload: str) -> Recipe:
    requires = recipe.requires if recipe.requires.cuda else _OFFLOAD_NEEDS
    return dataclasses.replace(
        recipe,
        name=f"{recipe.name}+{offload}-offload",
        description=f"{recipe.description}, with {offload} offloading",
        offload=offload,
        requires=requires,
    )


def _with_vae_tiling(recipe: Recipe) -> Recipe:
    return dataclasses.replace(recipe, name=f"{recipe.name}+vae-tiling", vae_tiling=True,
                               description=f"{recipe.description}, decoding the image tile by tile")


_BALANCED_NEEDS = Requirements(
    cuda=True,
    why="device_map='balanced' spreads the pipeline's components over the CUDA GPUs it sees",
    instead="one GPU with an offload recipe (for example bf16+model-offload), or the CPU with the tiny model",
)


def _build_registry() -> dict[str, Recipe]:
    base = [
        Recipe("bf16", "none", "no quantization: the baseline in the pipeline dtype (bf16, or fp16 without bf16)"),
        _bnb_recipe("bnb-8bit", "bitsandbytes LLM.int8() on transformer and T5", load_in_8bit=True),
        _bnb_recipe("bnb-4bit-fp4", "bitsandbytes 4-bit FP4 on transformer and T5", quant_type="fp4"),
        _bnb_recipe("bnb-4bit-nf4", "bitsandbytes 4-bit NF4 on transformer and T5", quant_type="nf4"),
        _bnb_recipe("bnb-4bit-nf4-double", "NF4 with nested (double) quantization of the scales",
                    quant_type="nf4", double_quant=True),
        _bnb_recipe("bnb-4bit-nf4-fp32-compute", "NF4 weights, matmuls computed in float32",
                    quant_type="nf4", compute_dtype=torch.float32),
        _torchao_recipe("torchao-int8wo", "torchao Int8WeightOnlyConfig", _int8_weight_only),
        _torchao_recipe("torchao-int8dq", "torchao Int8DynamicActivationInt8WeightConfig", _int8_dynamic),
        _torchao_recipe("torchao-int4wo", "torchao Int4WeightOnlyConfig(group_size=128)", _int4_weight_only,
                        _INT4_NEEDS),
        _torchao_recipe("torchao-float8wo", "torchao Float8WeightOnlyConfig", _float8_weight_only, _FP8_NEEDS),
        _torchao_recipe("torchao-float8dq-row", "torchao Float8DynamicActivationFloat8WeightConfig, per-row scales",
                        _float8_dynamic("row"), _FP8_NEEDS),
        _torchao_recipe("torchao-float8dq-tensor",
                        "torchao Float8DynamicActivationFloat8WeightConfig, per-tensor scales",
                        _float8_dynamic("tensor"), _FP8_NEEDS),
        *(_quanto_recipe(w) for w in ("int2", "int4", "int8", "float8")),
        *(Recipe(f"gguf-{t.lower()}", "gguf", f"GGUF {t} transformer loaded with from_single_file", gguf_type=t)
          for t in GGUF_TYPES),
        Recipe("fp8-layerwise-e4m3", "layerwise", "transformer weights stored in float8_e4m3fn and computed in bf16/fp16; diffusers skips norms, embeddings and proj_out by default",
               layerwise_storage_dtype=torch.float8_e4m3fn),
        Recipe("fp8-layerwise-e5m2", "layerwise", "transformer weights stored in float8_e5m2 and computed in bf16/fp16; diffusers skips norms, embeddings and proj_out by default",
               layerwise_storage_dtype=torch.float8_e5m2),
    ]
    registry = {r.name: r for r in base}
    offloaded = [_with_offload(registry["bf16"], mode) for mode in OFFLOAD_MODES]
    offloaded += [
        _with_offload(registry["bnb-4bit-nf4"], "model"),
        _with_offload(registry["bnb-8bit"], "model"),
        _with_offload(registry["fp8-layerwise-e4m3"], "group-leaf-stream"),
        _with_offload(registry["gguf-q2_k"], "model"),
    ]
    # candidates for the smallest GPU footprint (chapter 05): offloading plus tile-by-tile decoding
    offloaded += [
        _with_vae_tiling(_with_offload(registry[name], mode))
        for name, mode in [("bf16", "sequential"), ("bnb-4bit-nf4", "model"),
                           ("gguf-q2_k", "group-leaf-stream"), ("fp8-layerwise-e4m3", "group-leaf-stream")]
    ]
    offloaded.append(dataclasses.replace(
        registry["bf16"], name="bf16+balanced", device_map="balanced", requires=_BALANCED_NEEDS,
        description="no quantization, components spread over the GPUs by accelerate (device_map='balanced')"))
    registry.update({r.name: r for r in offloaded})
    return registry


RECIPES: dict[str, Recipe] = _build_registry()


def list_recipes(backend: str | None = None) -> list[str]:
    """Names of every recipe, or of those of one backend."""
    return [name for name, r in RECIPES.items() if backend is None or r.backend == backend]


def get_recipe(name: str | Recipe) -> Recipe:
    """The recipe called `name`; `ValueError` listing the valid names if there is none."""
    if isinstance(name, Recipe):
        return name
    if name not in RECIPES:
        raise ValueError(f"Unknown recipe {name!r}. Valid recipes: {', '.join(RECIPES)}.")
    return RECIPES[name]


def check_runs_here(recipe: str | Recipe, device: env.DeviceInfo | None = None,
                    dtype: torch.dtype | None = None) -> None:
    """Raise `UnsupportedHardwareError` if `recipe` in `dtype` cannot run on `device`. Loads nothing."""
    recipe = get_recipe(recipe)
    device = device or env.device_info()
    need = recipe.requires
    if need.cuda and device.kind != "cuda":
        raise UnsupportedHardwareError(
            f"Recipe {recipe.name!r} needs a CUDA GPU ({need.why}), and this device is {device.label}. "
            f"Instead: {need.instead}."
        )
    cc = device.compute_capability
    if need.min_compute_capability and cc is not None and cc < need.min_compute_capability:
        want = ".".join(map(str, need.min_compute_capability))
        raise UnsupportedHardwareError(
            f"Recipe {recipe.name!r} needs compute capability {want}+ ({need.why}); {device.label} has "
            f"{cc[0]}.{cc[1]}. Instead: {need.instead}."
        )
    if dtype == torch.bfloat16 and not device.bf16:
        raise UnsupportedHardwareError(
            f"bf16 needs compute capability 8.0+ (Ampere or newer), and {device.label} lacks it. "
            "Load in float16 instead (dtype=torch.float16), which is the default on this GPU."
        )


def why_not_here(recipe: str | Recipe, device: env.DeviceInfo, dtype: torch.dtype | None = None) -> str | None:
    """Why `recipe` cannot run on `device` (`check_runs_here`'s message), or None when it can."""
    try:
        check_runs_here(recipe, device, dtype)
    except UnsupportedHardwareError as error:
        return str(error)
    return None


def place_pipeline(pipe, device: str, offload: str | None = None):
    """Put `pipe` on `device`, whole (`offload=None`) or with one of `OFFLOAD_MODES`."""
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
        pipe.enable_group_offload(
            onload_device=torch.device(device),
            offload_device=torch.device("cpu"),
            offload_type=level,
            use_stream=offload.endswith("-stream"),
            **extra,
        )
    return pipe


def load_pipeline(model: str | None = None, recipe: str | Recipe = "bf16", *, device: str | None = None,
                  dtype: torch.dtype | None = None, gguf_file: str | Path | None = None, seed: int = 0):
    """Load a `FluxPipeline` for `model` with `recipe`, placed on `device`.

    Every check (model name, recipe name, hardware, gated access, network) happens before
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
            f"Model {spec.name!r} needs a CUDA GPU, and this device is {info.label}. Use QUANTLAB_MODEL=tiny."
        )
    if recipe.gguf_type and recipe.offload == "sequential":
        raise ValueError(
            f"Recipe {recipe.name!r}: sequential offload cannot move GGUF weights in diffusers 0.42 (accelerate "
            "re-creates each parameter without its GGUF type and fails with KeyError: None). Use group offload "
            "instead: gguf-q2_k+group-leaf-stream-offload+vae-tiling, or gguf-q2_k+model-offload."
        )
    check_runs_here(recipe, info, dtype)
    if recipe.gguf_type and gguf_file is None:
        raise ValueError(
            f"Recipe {recipe.name!r} loads a GGUF file: pass gguf_file=<path to a {recipe.gguf_type} .gguf>. "
            "Chapter 02 writes one from any FluxTransformer2DModel."
        )
    if recipe.gguf_type:
        gguf_info = ql_gguf.inspect_gguf(gguf_file)  # missing, truncated or corrupt: fail before any loading
    path = models.model_path(spec.name, seed=seed)

    load_kwargs = {}
    if recipe.gguf_type:
        ql_gguf.check_architecture(gguf_info, Path(path) / "transformer")  # the header read above, not the file again
        quantized_types = set(gguf_info.tensors_per_type) - {"F32", "F16"}  # 1-D and edge tensors stay in float
        if quantized_types - {recipe.gguf_type} or (recipe.gguf_type not in gguf_info.tensors_per_type):
            raise ValueError(f"Recipe {recipe.name!r} wants a {recipe.gguf_type} file, but {gguf_file} holds "
                             f"{gguf_info.tensors_per_type}. Pass the {recipe.gguf_type} file or pick its recipe.")
        load_kwargs["transformer"] = FluxTransformer2DModel.from_single_file(
            str(gguf_file), quantization_config=recipe.gguf_config(dtype), config=path, subfolder="transformer",
            dtype=dtype,
        )
    placed_while_loading = recipe.device_map is not None or (
        recipe.backend == "torchao" and recipe.offload is None and info.kind == "cuda")
    if recipe.device_map is not None:
        load_kwargs["device_map"] = recipe.device_map
    elif placed_while_loading:
        # torchao quantizes each weight where it is loaded, and without a device map that is the CPU:
        # for the 12B transformer, over six minutes of a GPU run went by there without finishing
        load_kwargs["device_map"] = torch.device(device).type
    pipe = FluxPipeline.from_pretrained(
        path, quantization_config=recipe.quantization_config(dtype), dtype=dtype, **load_kwargs
    )
    if recipe.layerwise_storage_dtype is not None:
        pipe.transformer.enable_layerwise_casting(storage_dtype=recipe.layerwise_storage_dtype, compute_dtype=dtype)
    if recipe.vae_tiling:
        pipe.vae.enable_tiling()
    return pipe if placed_while_loading else place_pipeline(pipe, device, recipe.offload)
