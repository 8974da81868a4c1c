"""One registry of named recipes: every way the course loads and runs FLUX, built with keywords.

A `Recipe` says which components are quantized and how (real `BitsAndBytesConfig`, `TorchAoConfig`,
`QuantoConfig`, `GGUFQuantizationConfig`, `SDNQConfig`, ... objects, made on demand), where the
pipeline lives (offloading, `device_map`), which speed-ups run after loading (`Speedups`: fused QKV,
an attention backend, quantized activations, `torch.compile`, a CUDA graph), and, for a small GPU such
as a free Colab T4, which whole script loads it with little host RAM (`LowRam`). Its name is only a
lookup key, for the command line and the results files: nothing parses it. `Recipe.check` compares
what the recipe needs with a device, before anything loads, and says what to use instead. The
planner reads `storage`, the way the transformer and T5 keep their Linear weights. Loading lives in
`quantlab.pipeline`; the speed-ups are applied by `quantlab.speed`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from . import env
from .env import Needs, UnsupportedHardwareError

__all__ = [
    "Recipe",
    "Speedups",
    "LowRam",
    "RECIPES",
    "OFFLOAD_MODES",
    "GGUF_TYPES",
    "QUANTIZED_ACTIVATIONS",
    "ATTENTION_BACKENDS",
    "FA3_ATTENTION",
    "FA3_REQUIREMENT",
    "COMPILE_MODES",
    "SCRIPTS_DIR",
    "UnsupportedHardwareError",
    "list_recipes",
    "get_recipe",
    "why_not_here",
]

# How a pipeline is placed on the device. None means `pipe.to(device)`.
OFFLOAD_MODES = ("model", "sequential", "group-block", "group-leaf", "group-leaf-stream")

# The GGUF types of the gguf-* recipes: those diffusers loads and chapter 02 writes.
GGUF_TYPES = ("BF16", "F16", "Q8_0", "Q6_K", "Q5_1", "Q5_K", "Q5_0", "Q4_1", "Q4_K", "Q4_0", "Q3_K", "Q2_K")

# torchao configs that quantize the activations too, applied to the loaded transformer with `quantize_`, so the
# matmuls themselves run in 8 bits: the `dq` ones find each activation's scale while running (dynamic);
# `float8static-tensor` uses one scale per Linear, observed once on calibration inputs.
QUANTIZED_ACTIVATIONS = ("float8dq-row", "float8dq-tensor", "float8static-tensor", "int8dq")
_FP8_ACTIVATIONS = ("float8dq-row", "float8dq-tensor", "float8static-tensor")

# Our short names for diffusers' attention backends that come with PyTorch (no extra package).
ATTENTION_BACKENDS = {
    "native": "native",  # PyTorch's SDPA picks a kernel itself
    "flash": "_native_flash",
    "cudnn": "_native_cudnn",
    "efficient": "_native_efficient",
    "math": "_native_math",
}
# FlashAttention-3, which PyTorch does not ship: `fa3` in bf16, `fa3-fp8` on q, k and v cast to float8 e4m3. Its
# forward-only wheel is the extra `hopper` in pyproject.toml, where this pin is set too.
FA3_ATTENTION = ("fa3", "fa3-fp8")
FA3_REQUIREMENT = "fa3-fwd==0.0.3"

# torch.compile modes; "default" passes no mode. The last two capture CUDA graphs.
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead")

# Public GGUF files of FLUX.1-dev's transformer (city96/FLUX.1-dev-gguf), one per type the course measured at full
# scale; `from_single_file` downloads them. Q4_K's is the "small" K-quant mix, Q4_K_S.
HUB_GGUF_FILES = {t: f"https://huggingface.co/city96/FLUX.1-dev-gguf/blob/main/flux1-dev-{name}.gguf" for t, name in
                  (("Q8_0", "Q8_0"), ("Q4_1", "Q4_1"), ("Q4_K", "Q4_K_S"), ("Q2_K", "Q2_K"))}

# Whole scripts a learner pastes: quantlab-free, one per recipe that has one (chapters' whole-recipe cells, the
# Colab copies' last section, `compare.recommend`).
SCRIPTS_DIR = Path(__file__).parent / "scripts"

ConfigFactory = Callable[[torch.dtype], Any]


# --- what each part of a recipe needs -------------------------------------------------------------

_BNB_NEEDS = Needs(
    "bitsandbytes through diffusers",
    why="diffusers 0.42 refuses bitsandbytes without a GPU ('No GPU found. A GPU is needed for quantization.')",
    instead="on a CPU, chapter 01 runs the same algorithms through bitsandbytes' Linear8bitLt and Linear4bit; "
    "or use a quanto-* or torchao-int8* recipe", cuda=True)
_FP8_NEEDS = Needs(
    "float8 matmuls", why="float8 matrix kernels need fp8 tensor cores (Ada or Hopper, compute capability 8.9+)",
    instead="torchao-int8wo or torchao-int8dq, or fp8-layerwise-e4m3 (which stores fp8 but computes in bf16/fp16)",
    cuda=True, min_cc=env.FP8_MIN_CC)
_INT4_NEEDS = Needs("torchao's int4 kernels", why="torchao's int4 weight-only kernels are CUDA kernels",
                    instead="torchao-int8wo on a CPU, or quanto-int4", cuda=True)
_OFFLOAD_NEEDS = Needs(
    "a GPU to offload from", cuda=True, instead="the same recipe without offloading",
    why="offloading moves weights between host RAM and a GPU; on a CPU everything already lives in RAM")
_BALANCED_NEEDS = Needs(
    "several GPUs", cuda=True, why="device_map='balanced' spreads the pipeline's components over the CUDA GPUs it sees",
    instead="one GPU with an offload recipe (for example bf16+model-offload), or the CPU with the tiny model")
_LOW_RAM_NEEDS = Needs(
    "a CUDA GPU to load straight onto", cuda=True,
    why="a low-RAM script sends every component straight to the GPU (device_map='cuda'), so that no weight waits "
    "in host RAM", instead="on a CPU, the chapters' own whole-recipe cells with the mini model")


@dataclass(frozen=True)
class Speedups:
    """What runs after loading to make a step fast, in this order (`quantlab.speed.apply_speedups`):

    fuse the QKV projections, choose the attention, [hand-written: the GELU as a sigmoid], quantize the
    activations (static fp8 observes them first), [hand-written: the single-block kernels and their joined
    projections], the inductor flags, `torch.compile` (the repeated blocks or the whole transformer), a
    CUDA graph around the forward pass, `channels_last` for the VAE. The hand-written steps (FlashAttention-3,
    `gelu_sigmoid`, `rope_kernel`, `single_block_kernels`, `fused_qkv_mlp`) are the lab's (`quantlab.lab.kernels`).
    Every chapter.
    """

    activations: str | None = None  # one of QUANTIZED_ACTIVATIONS
    fuse_qkv: bool = False
    attention: str | None = None  # a key of ATTENTION_BACKENDS, or one of FA3_ATTENTION
    gelu_sigmoid: bool = False
    rope_kernel: bool = False
    single_block_kernels: bool = False
    fused_qkv_mlp: bool = False
    compile: str | None = None  # "regional" (compile_repeated_blocks) or "whole" (transformer.compile)
    compile_mode: str = "default"
    fullgraph: bool = True
    inductor_flags: bool = False
    cuda_graph: bool = False
    vae_channels_last: bool = False

    def __post_init__(self):
        problem = self.problem()
        if problem:
            raise ValueError(problem)

    @property
    def any(self) -> bool:
        """Whether anything is applied at all."""
        return self != Speedups()

    @property
    def fp8(self) -> bool:
        """Whether the matmuls run in float8."""
        return self.activations in _FP8_ACTIVATIONS

    @property
    def hand_written(self) -> bool:
        """Whether a step needs the lab's hand-written code (FA3, the GELU rewrite, the Triton kernels)."""
        return bool(self.attention in FA3_ATTENTION or self.gelu_sigmoid or self.rope_kernel
                    or self.single_block_kernels or self.fused_qkv_mlp)

    @property
    def compiled_region(self) -> str | None:
        """What torch.compile compiles: 'repeated blocks', 'whole transformer', or None when eager."""
        return {"regional": "repeated blocks", "whole": "whole transformer"}.get(self.compile)

    def suffix(self) -> str:
        """The `+step` parts of a recipe name, in the order the steps are applied."""
        compile_part = None
        if self.compile:
            compile_part = ("compile" + ("-regional" if self.compile == "regional" else "")
                            + ("" if self.compile_mode == "default" else f"-{self.compile_mode}"))
        parts = ["fused-qkv" if self.fuse_qkv else None, f"attn-{self.attention}" if self.attention else None,
                 "gelu-sigmoid" if self.gelu_sigmoid else None, "rope-kernel" if self.rope_kernel else None,
                 "single-block-kernels" if self.single_block_kernels else None,
                 "fused-qkv-mlp" if self.fused_qkv_mlp else None, compile_part,
                 "inductor-flags" if self.inductor_flags else None, "cuda-graph" if self.cuda_graph else None,
                 "vae-channels-last" if self.vae_channels_last else None]
        return "".join(f"+{part}" for part in parts if part)

    def problem(self) -> str | None:
        """Why these steps do not go together, or None."""
        if self.activations is not None and self.activations not in QUANTIZED_ACTIVATIONS:
            return f"Unknown activations {self.activations!r}. Valid: {', '.join(QUANTIZED_ACTIVATIONS)}."
        if self.attention is not None and self.attention not in (*ATTENTION_BACKENDS, *FA3_ATTENTION):
            return f"Unknown attention {self.attention!r}. Valid: {', '.join((*ATTENTION_BACKENDS, *FA3_ATTENTION))}."
        if self.compile not in (None, "regional", "whole"):
            return f"Unknown compile {self.compile!r}: 'regional' (compile_repeated_blocks) or 'whole'."
        if self.compile_mode not in COMPILE_MODES:
            return f"Unknown compile mode {self.compile_mode!r}. Modes: {', '.join(COMPILE_MODES)}."
        if self.inductor_flags and not self.compile:
            return "inductor-flags set how torch.compile compiles; add a compile step."
        if self.gelu_sigmoid and not self.compile:
            return ("gelu-sigmoid rewrites the GELU for the kernels torch.compile generates; eager, it only adds kernel "
                    "launches. Add a compile step.")
        if self.rope_kernel and not (self.attention == "fa3-fp8" and self.fuse_qkv):
            return ("rope-kernel reads the fused QKV projection and writes fp8 q, k and v for FlashAttention-3: add "
                    "fused-qkv and attn-fa3-fp8.")
        if self.single_block_kernels and not (self.activations == "float8static-tensor" and self.rope_kernel):
            return ("single-block-kernels quantizes to fp8 with each Linear's static scale and hands its output to the "
                    "rope kernel: start with float8static-tensor, and add fused-qkv, attn-fa3-fp8 and rope-kernel.")
        if self.fused_qkv_mlp and not self.single_block_kernels:
            return ("fused-qkv-mlp joins two Linears that only the single-block kernels' forward calls as one matmul "
                    "(diffusers' block forward calls them one by one): add single-block-kernels (and what it needs).")
        if self.cuda_graph and self.compile == "whole":
            return ("cuda-graph records the transformer's forward pass, which a whole-model compile replaces with its "
                    "own. Instead: compile-regional+cuda-graph, or compile-reduce-overhead, with which torch.compile "
                    "records CUDA graphs itself.")
        return None

    def needs(self) -> list[Needs]:
        """What these steps need from the device."""
        needs = []
        if self.fp8:
            needs.append(Needs("float8 matmuls", cuda=True, min_cc=env.FP8_MIN_CC,
                               why="it runs its matmuls in float8, which needs fp8 tensor cores (Ada or Hopper)",
                               instead="int8dq, or bf16 (fp16 on a T4) with fused-qkv and compile-regional"))
        if self.cuda_graph:
            needs.append(Needs("CUDA graphs", cuda=True, why="a CUDA graph records CUDA kernels",
                               instead="leave out cuda-graph; on a CPU, compile-regional is the step that pays"))
        if self.attention in ("flash", "cudnn", "efficient"):
            needs.append(Needs(f"the {self.attention} attention kernel", cuda=True,
                               why=f"the {self.attention} attention kernel is a CUDA kernel",
                               instead="attn-native, which lets PyTorch pick a CPU kernel"))
        if self.attention in ("flash", "cudnn"):
            needs.append(Needs(f"the {self.attention} attention kernel", min_cc=(8, 0),
                               why=f"the {self.attention} attention kernel needs compute capability 8.0+",
                               instead="attn-efficient or attn-native"))
        if self.attention in FA3_ATTENTION:
            needs.append(Needs(
                "FlashAttention-3", min_cc=(9, 0), below_cc=(10, 0),
                why="FlashAttention-3 is written for Hopper GPUs (compute capability 9.0: H100, H200)",
                instead="attn-cudnn on a GPU of compute capability 8.0+, attn-native elsewhere (its wheel is a CUDA "
                        "13 build for torch 2.10+, also installed by `pip install -e .[hopper]`)",
                modules=(("fa3_fwd_interface", FA3_REQUIREMENT),)))
        if self.rope_kernel or self.single_block_kernels:
            steps = "rope-kernel and single-block-kernels" if self.single_block_kernels else "rope-kernel"
            needs.append(Needs(
                f"Triton ({steps})", min_cc=env.FP8_MIN_CC,
                why=f"{steps} {'run' if self.single_block_kernels else 'runs'} Triton kernels for CUDA GPUs, which "
                    "compile fp8 from compute capability 8.9",
                instead=f"leave out {steps}; torch.compile fuses the same steps into its own kernels",
                modules=(("triton", "triton"),)))
        return needs


@dataclass(frozen=True)
class LowRam:
    """How a whole script runs FLUX.1-dev with little host RAM: every weight straight to the GPU, in fp16.

    `encode_then_free`: the prompt is encoded first and the text encoders freed before the transformer
    arrives; `prequantized`: the transformer is read from a checkpoint saved in its quantized form, which
    `prepare` (parts of SCRIPTS_DIR, run once before) writes where none is downloaded; `t4_size`: the largest
    square image measured to fit a T4 (results/09_colab_t4_sim_flux-dev-shaped.json). Every chapter.
    """

    encode_then_free: bool = True
    prequantized: bool = False
    prepare: tuple[str, ...] = ()
    t4_size: int = 1024


# The settings every whole script starts from (`Recipe.code`): on a big GPU, FLUX.1-dev in bf16 at its own size.
# MAX_SEQUENCE_LENGTH is T5's prompt length: FLUX.1-dev's 512; the mini model learned 48 and draws nothing at 512.
SCRIPT_SETTINGS = {"MODEL_ID": "black-forest-labs/FLUX.1-dev", "PROMPT": "a photo of a cat sitting on a red chair in "
                   "a sunny room", "HEIGHT": 1024, "WIDTH": 1024, "STEPS": 28, "GUIDANCE": 3.5,
                   "MAX_SEQUENCE_LENGTH": 512, "SEED": 0, "DEVICE": "cuda", "DTYPE": "bfloat16"}


@dataclass(frozen=True)
class Recipe:
    """A named way to load and run FLUX: what is quantized and how, where it lives, and what runs after loading.
    Every chapter."""

    name: str
    backend: str  # "none", "bitsandbytes", "torchao", "quanto", "gguf", "layerwise", "sdnq", "modelopt", ...
    description: str
    transformer: ConfigFactory | None = None  # dtype -> diffusers quantization config
    text_encoder_2: ConfigFactory | None = None  # dtype -> transformers quantization config
    storage: tuple[str, str] = ("16bit", "16bit")  # how the transformer and T5 keep their Linear weights (plan)
    layerwise_storage_dtype: torch.dtype | None = None
    gguf_type: str | None = None
    offload: str | None = None
    vae_tiling: bool = False  # decode the image tile by tile (`pipe.vae.enable_tiling()`)
    device_map: str | None = None  # "balanced": accelerate spreads the components over every GPU
    speedups: Speedups = Speedups()
    low_ram: LowRam | None = None
    checkpoint: str | None = None  # a pre-quantized checkpoint it loads: "bfl" (one file), "prequantized" (a folder)
    script: tuple[str, ...] = ()  # the parts (files of SCRIPTS_DIR) of the whole script a learner pastes
    script_settings: tuple[tuple[str, Any], ...] = ()  # settings beyond SCRIPT_SETTINGS that the script reads
    backend_needs: tuple[Needs, ...] = ()

    def needs(self) -> list[Needs]:
        """Everything this recipe needs from the device: its backend's, its placement's and its speed-ups'."""
        needs = list(self.backend_needs)
        if self.offload is not None:
            needs.append(_OFFLOAD_NEEDS)
        if self.device_map == "balanced":
            needs.append(_BALANCED_NEEDS)
        if self.low_ram is not None:
            needs.append(_LOW_RAM_NEEDS)
        return needs + self.speedups.needs()

    def check(self, device: env.DeviceInfo | None = None, dtype: torch.dtype | None = None,
              packages: bool = True) -> Recipe:
        """Raise `UnsupportedHardwareError` if this recipe in `dtype` cannot run on `device`; loads nothing.

        `packages=False` asks about the hardware alone, for a GPU described rather than present.
        """
        env.check_hardware(self.name, self.needs(), device, dtype, packages=packages)
        return self

    def quantization_config(self, dtype: torch.dtype = torch.bfloat16):
        """The `PipelineQuantizationConfig` this recipe passes to `FluxPipeline.from_pretrained`, or None (also for a
        recipe that reads a pre-quantized checkpoint, whose transformer is loaded apart)."""
        from diffusers import PipelineQuantizationConfig

        if self.checkpoint:
            return None
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

    def script_body(self) -> str:
        """The whole script without its settings: what a chapter's whole-recipe cell shows. The imports of its parts
        come first, once each, then the parts in order."""
        if not self.script:
            raise ValueError(f"Recipe {self.name!r} has no whole script. Recipes with one: "
                             f"{', '.join(n for n, r in RECIPES.items() if r.script)}.")
        imports: list[str] = []
        bodies = []
        for part in self.script:
            lines = (SCRIPTS_DIR / part).read_text().strip("\n").splitlines()
            first = next((i for i, line in enumerate(lines) if line and not line.startswith(("import ", "from "))),
                         len(lines))
            imports += [line for line in lines[:first] if line and line not in imports]
            bodies.append("\n".join(lines[first:]).strip("\n"))
        names: dict[str, list[str]] = {}  # `from module import a, b` lines of every part, merged by module
        for line in (line for line in imports if line.startswith("from ")):
            module, _, imported = line.removeprefix("from ").partition(" import ")
            names.setdefault(module, [])
            names[module] += [n.strip() for n in imported.split(",") if n.strip() not in names[module]]
        plain = "\n".join(sorted(line for line in imports if line.startswith("import ")))
        merged = "\n".join(f"from {module} import {', '.join(sorted(imported))}" for module, imported in sorted(names.items()))
        return "\n\n".join(filter(None, [plain, merged, *bodies])) + "\n"

    def code(self, **settings: Any) -> str:
        """The whole script, ready to paste: its settings (`SCRIPT_SETTINGS`, this recipe's, then `settings`), then
        its parts. A low-RAM recipe's settings are a T4's: fp16 on the GPU."""
        values = {**SCRIPT_SETTINGS, **({"DTYPE": "float16"} if self.low_ram else {}), **dict(self.script_settings),
                  **settings}
        lines = ["import torch", ""] + [f"{key} = {('torch.' + value) if key == 'DTYPE' else repr(value)}"
                                        for key, value in values.items()]
        return f"# {self.name}: {self.description}\n" + "\n".join(lines) + "\n\n" + self.script_body()


def derive(recipe: Recipe, *, name: str | None = None, description: str | None = None, **changes) -> Recipe:
    """`recipe` with `changes` (offload, vae_tiling, speedups, ...), named after them unless `name` is given. It builds
    the registry's variants when quantlab is imported (every chapter)."""
    new = dataclasses.replace(recipe, **changes)
    if name is None:
        name = recipe.name
        if new.offload and new.offload != recipe.offload:
            name += f"+{new.offload}-offload"
        if new.vae_tiling and not recipe.vae_tiling:
            name += "+vae-tiling"
        if new.speedups != recipe.speedups:
            name += new.speedups.suffix()
    added = [f"with {new.offload} offloading" if new.offload != recipe.offload else None,
             "decoding the image tile by tile" if new.vae_tiling != recipe.vae_tiling else None,
             f"then {new.speedups.suffix().lstrip('+').replace('+', ', ')}" if new.speedups != recipe.speedups else None]
    description = description or ", ".join([recipe.description, *filter(None, added)])
    return dataclasses.replace(new, name=name, description=description)


# --- the backends' configs ---------------------------------------------------------------------------


def _bnb(name: str, description: str, *, load_in_8bit: bool = False, quant_type: str | None = None,
         double_quant: bool = False, compute_dtype: torch.dtype | None = None, **kwargs) -> Recipe:
    def settings(dtype: torch.dtype) -> dict[str, Any]:
        if load_in_8bit:
            return {"load_in_8bit": True}
        return {"load_in_4bit": True, "bnb_4bit_quant_type": quant_type, "bnb_4bit_use_double_quant": double_quant,
                "bnb_4bit_compute_dtype": compute_dtype or dtype}

    def transformer(dtype: torch.dtype):
        from diffusers import BitsAndBytesConfig

        return BitsAndBytesConfig(**settings(dtype))

    def text_encoder_2(dtype: torch.dtype):
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(**settings(dtype))

    scheme = "int8-row" if load_in_8bit else "nf4-double" if double_quant else "nf4"
    return Recipe(name, "bitsandbytes", description, transformer, text_encoder_2, storage=(scheme, scheme),
                  backend_needs=(_BNB_NEEDS,), **kwargs)


def _torchao_config(class_name: str, **kwargs) -> Callable[[], Any]:
    def make():
        import torchao.quantization as quantization

        values = {k: v() if callable(v) else v for k, v in kwargs.items()}
        return getattr(quantization, class_name)(**values)

    return make


def _granularity(name: str) -> Callable[[], Any]:
    def make():
        from torchao.quantization import PerRow, PerTensor

        return PerRow() if name == "row" else PerTensor()

    return make


def _torchao(name: str, description: str, make_config: Callable[[], Any], scheme: str,
             needs: tuple[Needs, ...] = ()) -> Recipe:
    def transformer(dtype: torch.dtype):
        from diffusers import TorchAoConfig

        return TorchAoConfig(make_config())

    def text_encoder_2(dtype: torch.dtype):
        from transformers import TorchAoConfig

        return TorchAoConfig(make_config())

    return Recipe(name, "torchao", description, transformer, text_encoder_2, storage=(scheme, scheme),
                  backend_needs=needs)


def _quanto(weights: str) -> Recipe:
    def transformer(dtype: torch.dtype):
        from diffusers import QuantoConfig

        return QuantoConfig(weights_dtype=weights)

    def text_encoder_2(dtype: torch.dtype):
        from transformers import QuantoConfig

        return QuantoConfig(weights=weights)

    scheme = {"int8": "int8-row", "float8": "int8-row", "int4": "int4-g128", "int2": "int2-g128"}[weights]
    return Recipe(f"quanto-{weights}", "quanto", f"Quanto {weights} weights on transformer and T5", transformer,
                  text_encoder_2, storage=(scheme, scheme),
                  script=("quanto_int8.py", "load_quantized.py", "generate.py") if weights == "int8" else ())


# --- the registry ---------------------------------------------------------------------------------


def _quantization_recipes() -> list[Recipe]:
    fp8 = (_FP8_NEEDS,)
    return [
        Recipe("bf16", "none", "no quantization: the baseline in the pipeline dtype (bf16, or fp16 without bf16)",
               script=("load_bf16.py", "generate.py")),
        _bnb("bnb-8bit", "bitsandbytes LLM.int8() on transformer and T5", load_in_8bit=True),
        _bnb("bnb-4bit-fp4", "bitsandbytes 4-bit FP4 on transformer and T5", quant_type="fp4"),
        _bnb("bnb-4bit-nf4", "bitsandbytes 4-bit NF4 on transformer and T5", quant_type="nf4",
             script=("bnb_nf4.py", "load_quantized.py", "generate.py")),
        _bnb("bnb-4bit-nf4-double", "NF4 with nested (double) quantization of the scales", quant_type="nf4",
             double_quant=True),
        _bnb("bnb-4bit-nf4-fp32-compute", "NF4 weights, matmuls computed in float32", quant_type="nf4",
             compute_dtype=torch.float32),
        dataclasses.replace(
            _torchao("torchao-int8wo", "torchao Int8WeightOnlyConfig", _torchao_config("Int8WeightOnlyConfig"),
                     "int8-row"), script=("torchao_int8wo.py", "load_quantized_on_device.py", "generate.py")),
        _torchao("torchao-int8dq", "torchao Int8DynamicActivationInt8WeightConfig",
                 _torchao_config("Int8DynamicActivationInt8WeightConfig"), "int8-row"),
        _torchao("torchao-int4wo", "torchao Int4WeightOnlyConfig(group_size=128)",
                 _torchao_config("Int4WeightOnlyConfig", group_size=128), "int4-g128", (_INT4_NEEDS,)),
        _torchao("torchao-float8wo", "torchao Float8WeightOnlyConfig", _torchao_config("Float8WeightOnlyConfig"),
                 "int8-row", fp8),
        _torchao("torchao-float8dq-row", "torchao Float8DynamicActivationFloat8WeightConfig, per-row scales",
                 _torchao_config("Float8DynamicActivationFloat8WeightConfig", granularity=_granularity("row")),
                 "int8-row", fp8),
        _torchao("torchao-float8dq-tensor", "torchao Float8DynamicActivationFloat8WeightConfig, per-tensor scales",
                 _torchao_config("Float8DynamicActivationFloat8WeightConfig", granularity=_granularity("tensor")),
                 "int8-row", fp8),
        *(_quanto(w) for w in ("int2", "int4", "int8", "float8")),
        *(Recipe(f"gguf-{t.lower()}", "gguf", f"GGUF {t} transformer loaded with from_single_file", gguf_type=t,
                 storage=(f"gguf-{t}", "16bit"), script=("load_gguf.py", "generate.py") if t in HUB_GGUF_FILES else (),
                 script_settings=(("GGUF_FILE", HUB_GGUF_FILES[t]),) if t in HUB_GGUF_FILES else ())
          for t in GGUF_TYPES),
        *(Recipe(f"fp8-layerwise-{kind}", "layerwise",
                 f"transformer weights stored in float8_{kind}{'fn' if kind == 'e4m3' else ''} and computed in "
                 "bf16/fp16; diffusers skips norms, embeddings and proj_out by default",
                 layerwise_storage_dtype=dtype, storage=("fp8-storage", "16bit"),
                 script=("load_fp8_layerwise.py", "generate.py") if kind == "e4m3" else ())
          for kind, dtype in (("e4m3", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2))),
    ]


def _offload_recipes(registry: dict[str, Recipe]) -> list[Recipe]:
    offloaded = [derive(registry["bf16"], offload=mode, script=()) for mode in OFFLOAD_MODES]
    offloaded[0] = dataclasses.replace(offloaded[0], script=("load_bf16_model_offload.py", "generate.py"))
    offloaded += [derive(registry[name], offload=mode, script=()) for name, mode in [
        ("bnb-4bit-nf4", "model"), ("bnb-8bit", "model"), ("fp8-layerwise-e4m3", "group-leaf-stream"),
        ("gguf-q2_k", "model")]]
    offloaded[len(OFFLOAD_MODES)] = dataclasses.replace(
        offloaded[len(OFFLOAD_MODES)], script=("bnb_nf4.py", "load_quantized_model_offload.py", "generate.py"))
    # candidates for the smallest GPU footprint (chapter 05): offloading plus tile-by-tile decoding
    offloaded += [derive(registry[name], offload=mode, vae_tiling=True, script=()) for name, mode in [
        ("bf16", "sequential"), ("bnb-4bit-nf4", "model"), ("gguf-q2_k", "group-leaf-stream"),
        ("fp8-layerwise-e4m3", "group-leaf-stream")]]
    offloaded.append(derive(registry["bf16"], name="bf16+balanced", device_map="balanced", script=(),
                            description="no quantization, components spread over the GPUs by accelerate "
                                        "(device_map='balanced')", backend_needs=(_BALANCED_NEEDS,)))
    return offloaded


def _speed_recipes(registry: dict[str, Recipe]) -> list[Recipe]:
    """Chapter 06's recipes: the transformer loaded in bf16 (fp16 without bf16), then the speed-ups."""
    bf16 = registry["bf16"]
    activations = {name: derive(bf16, name=name, description=f"bf16 weights, then torchao {name} on the transformer",
                                storage=("int8-row", "16bit"), speedups=Speedups(activations=name), script=())
                   for name in QUANTIZED_ACTIVATIONS}
    fa3_fp8 = dict(fuse_qkv=True, attention="fa3-fp8", compile="regional", cuda_graph=True)
    kernels = [dict(gelu_sigmoid=True), dict(gelu_sigmoid=True, rope_kernel=True),
               dict(gelu_sigmoid=True, rope_kernel=True, single_block_kernels=True),
               dict(gelu_sigmoid=True, rope_kernel=True, single_block_kernels=True, fused_qkv_mlp=True)]
    steps: list[tuple[Recipe, dict]] = [
        (bf16, dict(compile="whole")), (bf16, dict(compile="regional")),
        (bf16, dict(compile="regional", compile_mode="reduce-overhead")), (bf16, dict(fuse_qkv=True)),
        *((bf16, dict(attention=kind)) for kind in ("flash", "cudnn", "efficient", "native", "math")),
        (bf16, dict(fuse_qkv=True, compile="regional", compile_mode="max-autotune-no-cudagraphs")),
        (bf16, dict(fuse_qkv=True, attention="cudnn", compile="regional", cuda_graph=True)),
        (bf16, dict(fuse_qkv=True, attention="fa3", compile="regional", cuda_graph=True)),
        (activations["float8dq-tensor"], dict(compile="regional")),
        (activations["float8dq-tensor"], dict(fuse_qkv=True, attention="cudnn", compile="regional")),
        (activations["float8dq-tensor"], dict(fuse_qkv=True, attention="cudnn", compile="regional", cuda_graph=True)),
        (activations["float8dq-row"], dict(fuse_qkv=True, compile="whole")),
        (activations["float8dq-row"], dict(fuse_qkv=True, compile="regional")),
        (activations["float8dq-row"], dict(fuse_qkv=True, attention="cudnn", compile="regional", cuda_graph=True)),
        (activations["float8dq-row"], dict(fuse_qkv=True, attention="cudnn", compile="regional", inductor_flags=True,
                                           cuda_graph=True)),
        (activations["float8dq-row"], fa3_fp8),
        (activations["int8dq"], dict(compile="regional")),
        (activations["float8static-tensor"], fa3_fp8),
        (activations["float8static-tensor"], {**fa3_fp8, "compile_mode": "max-autotune-no-cudagraphs"}),
        *((activations["float8static-tensor"], {**fa3_fp8, **extra}) for extra in kernels),
    ]
    speed = [derive(base, speedups=dataclasses.replace(base.speedups, **changes), script=()) for base, changes in steps]
    speed.append(derive(bf16, speedups=Speedups(fuse_qkv=True, compile="regional"), script=("load_speed.py",
                                                                                           "generate.py")))
    # compiled whole pipelines of chapters 01 and 03 (quantlab.lab.bench --compile): named "+compile" whatever
    # they compiled, as their rows are
    compiled = [derive(registry[base], name=f"{base}+compile", speedups=Speedups(compile=region, fullgraph=full),
                       script=()) for base, region, full in [
        ("bnb-4bit-nf4", "whole", True), ("bnb-8bit", "whole", False), ("torchao-float8wo", "regional", False),
        ("torchao-float8dq-row", "whole", False)]]
    return [*activations.values(), *speed, *compiled]


def _low_ram_recipes(registry: dict[str, Recipe]) -> list[Recipe]:
    """The Colab recipes: FLUX.1-dev within a T4's 15 GiB and a free runtime's 12.7 GB of host RAM, in fp16."""
    encode, load, generate = "encode_then_free.py", "load_transformer_then_pipeline.py", "generate_from_embeds.py"

    def low(base: str, name: str, description: str, script: tuple[str, ...], settings=(), **low_ram) -> Recipe:
        recipe = registry[base]  # its transformer's config; T5 stays in fp16, encoded first and freed
        return derive(recipe, name=name, description=description, low_ram=LowRam(**low_ram), script=script,
                      script_settings=settings, storage=(recipe.storage[0], "16bit"), text_encoder_2=None)

    return [
        low("bnb-4bit-nf4", "nf4-encode-then-free", "CLIP and T5 encode the prompt on the GPU and are freed; then the "
            "transformer is quantized to NF4 while it loads, straight to the GPU, and the VAE joins it",
            (encode, "t4_nf4.py", load, generate)),
        low("bnb-8bit", "int8-encode-then-free", "as nf4-encode-then-free, with the transformer in LLM.int8(): twice "
            "the memory of NF4 and slower, but closer to fp16", (encode, "t4_int8.py", load, generate)),
        dataclasses.replace(low("bnb-4bit-nf4", "nf4-t5-nf4", "one PipelineQuantizationConfig quantizes the "
                                "transformer and T5 to NF4 while they load; every component stays on the GPU",
                                ("bnb_nf4.py", "load_nf4_t5_nf4.py", "generate.py"), encode_then_free=False,
                                t4_size=512), storage=("nf4", "nf4"),
                            text_encoder_2=registry["bnb-4bit-nf4"].text_encoder_2),
        low("bnb-4bit-nf4", "nf4-prequantized", "as nf4-encode-then-free, with the transformer read from a checkpoint "
            "saved in NF4 (diffusers/FLUX.1-dev-bnb-4bit on the Hub is one: 6.7 GB to download, not 23.8)",
            (encode, "t4_prequantized.py", generate), settings=(("NF4_CHECKPOINT", "diffusers/FLUX.1-dev-bnb-4bit"),),
            prequantized=True, prepare=("t4_nf4.py", "save_nf4.py")),
        low("torchao-int8wo", "torchao-int8wo-encode-then-free", "as nf4-encode-then-free, with the transformer in "
            "torchao int8 weight-only, quantized on the GPU as it loads", (encode, "t4_torchao_int8wo.py", load, generate)),
        low("gguf-q4_k", "gguf-q4_k-encode-then-free", "the prompt encoded first; then a Q4_K GGUF file of the "
            "transformer (6.8 GB) read with from_single_file onto the GPU", (encode, "t4_gguf.py", generate),
            settings=(("GGUF_FILE", HUB_GGUF_FILES["Q4_K"]),)),
        low("quanto-int8", "quanto-int8-encode-then-free", "the prompt encoded first; then the transformer quantized "
            "to int8 by Quanto while it loads onto the GPU", (encode, "t4_quanto_int8.py", load, generate)),
    ]


def _newer_recipes(registry: dict[str, Recipe]) -> list[Recipe]:
    """Chapter 08's backends: each transformer quantized while it loads, or read from a pre-quantized checkpoint."""
    def config(class_name: str, **kwargs) -> ConfigFactory:
        def make(dtype: torch.dtype):
            import diffusers

            return getattr(diffusers, class_name)(**{k: dtype if v is DTYPE else v for k, v in kwargs.items()})
        return make

    sdnq = Needs("the sdnq package", why="diffusers' SDNQConfig hands the quantization to sdnq",
                 instead="another backend's recipe", modules=(("sdnq", "sdnq==0.2.8"),))
    modelopt = Needs(f"{env.MODELOPT_PIN}", why="diffusers 0.42.1 drives modelopt 0.37.0 and no newer",
                     instead=f"pip install {env.MODELOPT_PIN}", modules=(("modelopt", env.MODELOPT_PIN),),
                     software=env.modelopt_problem)
    autoround = Needs("the auto-round package", why="diffusers' AutoRoundConfig loads through auto-round's kernels",
                      instead="pip install auto-round==0.16.1", modules=(("auto_round", "auto-round==0.16.1"),))
    nunchaku = Needs("a Turing-to-Ada or Blackwell GPU and the kernels package", cuda=True, min_cc=(7, 5), not_major=(9,),
                     why="Nunchaku Lite's int4 kernels are built for compute capability 7.5+ and refused on Hopper, "
                         "and fetched from the Hub by the kernels package",
                     instead="SDNQ uint4 with use_svd=True (SVDQuant's low-rank branch, without 4-bit activations)",
                     modules=(("kernels", "kernels"),))
    return [
        Recipe("sdnq-int8", "sdnq", "SDNQ int8 weights, one scale per output row, quantized while loading",
               config("SDNQConfig", weights_dtype="int8"), storage=("int8-row", "16bit"), backend_needs=(sdnq,),
               script=("sdnq_int8.py", "load_quantized.py", "generate.py")),
        Recipe("sdnq-int8-matmul", "sdnq", "SDNQ int8 weights, and the matmuls in int8 (activations quantized too)",
               config("SDNQConfig", weights_dtype="int8", use_quantized_matmul=True), storage=("int8-row", "16bit"),
               backend_needs=(sdnq,)),
        Recipe("sdnq-uint4", "sdnq", "SDNQ 4-bit weights, a scale and a zero point per 64",
               config("SDNQConfig", weights_dtype="uint4"), storage=("uint4-g64", "16bit"), backend_needs=(sdnq,)),
        Recipe("sdnq-uint4-svd", "sdnq", "SDNQ 4-bit weights with a rank-32 low-rank branch in 16 bits (SVDQuant's idea)",
               config("SDNQConfig", weights_dtype="uint4", use_svd=True, svd_rank=32), storage=("uint4-g64", "16bit"),
               backend_needs=(sdnq,)),
        *(Recipe(f"modelopt-{kind.lower()}", "modelopt", f"NVIDIA ModelOpt {kind} weights, quantized while loading",
                 config("NVIDIAModelOptConfig", quant_type=kind), storage=("int8-row", "16bit"),
                 backend_needs=(modelopt,),
                 script=("modelopt_fp8.py", "load_quantized.py", "generate.py") if kind == "FP8" else ())
          for kind in ("FP8", "INT8")),
        Recipe("bfl-fp8r", "bfl", "a BFL fp8r file: the blocks' Linears in float8 with a scale per row, read with "
               "from_single_file", config("BFLQuantizationConfig", compute_dtype=DTYPE), storage=("int8-row", "16bit"),
               checkpoint="bfl", script=("load_bfl.py", "generate.py"),
               script_settings=(("BFL_FILE", "flux1-dev-fp8r.safetensors"),)),
        Recipe("autoround-w4a16", "autoround", "an AutoRound W4A16 checkpoint: 4-bit weights in groups of 128, "
               "quantized beforehand by the auto-round library", storage=("int4-g128", "16bit"),
               backend_needs=(autoround,), checkpoint="prequantized", script=("load_autoround.py", "generate.py"),
               script_settings=(("AUTOROUND_FOLDER", "flux1-dev-autoround-w4a16"),)),
        Recipe("nunchaku-lite-svdq-int4", "nunchaku", "a Nunchaku Lite SVDQuant checkpoint: 4-bit weights and "
               "activations with a 16-bit low-rank branch", storage=("int4-g128", "16bit"), backend_needs=(nunchaku,),
               checkpoint="prequantized"),
    ]


DTYPE = object()  # in a config's keywords: the pipeline's dtype, filled in when the config is made


def _build_registry() -> dict[str, Recipe]:
    registry: dict[str, Recipe] = {}
    for build in (lambda _: _quantization_recipes(), _offload_recipes, _speed_recipes, _low_ram_recipes, _newer_recipes):
        for recipe in build(registry):
            if recipe.name in registry:
                raise ValueError(f"Two recipes are called {recipe.name!r}.")
            registry[recipe.name] = recipe
    return registry

RECIPES: dict[str, Recipe] = _build_registry()


def list_recipes(backend: str | None = None) -> list[str]:
    """Names of every recipe, or of those of one backend: what `get_recipe` and the lab's `--recipes` accept."""
    return [name for name, r in RECIPES.items() if backend is None or r.backend == backend]


def get_recipe(name: str | Recipe) -> Recipe:
    """The recipe called `name`; `ValueError` listing the valid names if there is none (every chapter)."""
    if isinstance(name, Recipe):
        return name
    if name not in RECIPES:
        raise ValueError(f"Unknown recipe {name!r}. Valid recipes: {', '.join(RECIPES)}.")
    return RECIPES[name]


def why_not_here(recipe: str | Recipe, device: env.DeviceInfo, dtype: torch.dtype | None = None,
                 packages: bool = True) -> str | None:
    """Why `recipe` cannot run on `device` (`Recipe.check`'s message), or None when it can (chapter 07)."""
    try:
        get_recipe(recipe).check(device, dtype, packages=packages)
    except UnsupportedHardwareError as error:
        return str(error)
    return None
