"""The models the course runs on, and how each one reaches `FluxPipeline.from_pretrained`.

Five models are registered:

- ``tiny``: a scaled-down FLUX.1-dev with random weights, built offline from configs and
  saved once to a cache folder. It runs on a CPU in seconds; the unit tests use it.
- ``mini``: a small FLUX trained on captioned coloured shapes (``quantlab.train_mini``): the
  tiny model's tokenizers and frozen text encoders, and a trained transformer and VAE shipped
  in ``quantlab/data/mini`` (13 MB). It draws 64×64 pictures that follow their prompts, so
  quantization damage is visible, and measurable as prompt accuracy, on a CPU. The course's default.
- ``flux-dev-shaped``: the real 12B FLUX.1-dev architecture (and real-shape T5-XXL and
  CLIP-L) with random weights, generated on the GPU and saved to the cache, for measuring
  memory and speed at full scale without a download.
- ``black-forest-labs/FLUX.1-dev`` (gated) and ``black-forest-labs/FLUX.1-schnell``: the
  real checkpoints on the Hugging Face Hub.

Whatever the model, ``model_path`` returns something that ``from_pretrained`` accepts: a
local folder or a Hub repo id. The loading code is the same for all four.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .env import GIB
from .files import atomic_output, remove_stale_partials

__all__ = [
    "ModelSpec",
    "ModelUnavailableError",
    "MODELS",
    "DEFAULT_MODEL",
    "list_models",
    "get_model",
    "model_path",
    "cache_dir",
    "build_component",
    "build_embedded_model",
    "meta_component",
    "component_param_counts",
    "linear_layers",
    "verify_cache",
    "COMPONENT_NAMES",
]

DEFAULT_MODEL = "mini"

# The seven pieces of a FluxPipeline, in the order the pipeline's constructor takes them.
COMPONENT_NAMES = ("scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "transformer")
MODEL_COMPONENTS = ("transformer", "text_encoder_2", "text_encoder", "vae")


class ModelUnavailableError(RuntimeError):
    """A model cannot be loaded here: gated without a token, no network, or no suitable device. Every chapter."""


# ---------------------------------------------------------------------------------------------
# Configs. The FLUX.1-dev values are those of the published checkpoint's config files; they are
# embedded here so that sizes can be computed, and the full-scale model built, with no network.
# ---------------------------------------------------------------------------------------------

FLUX_DEV_TRANSFORMER = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}
FLUX_DEV_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "force_upcast": True,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
}
CLIP_L_TEXT = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 1,
}
T5_XXL_ENCODER = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
    "layer_norm_epsilon": 1e-6,
    "is_encoder_decoder": False,
    "use_cache": False,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "eos_token_id": 1,
}
FLUX_DEV_SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}

# The tiny model: FLUX.1-dev's shape, scaled down. Every Linear that FLUX.1-dev quantizes has
# in and out features that are multiples of 256 (inner dim 2 x 128 = 256, MLP 1024, AdaLN 1536,
# single-block proj_out 1280 -> 256), so int4 groups of 128, K-quant super-blocks of 256 and
# bitsandbytes blocks all apply. The small layers keep their real widths: x_embedder takes 64
# features (16 latent channels x 2 x 2 patches), the timestep and guidance embedders 256, and
# proj_out returns 64.
TINY_TRANSFORMER = {
    **FLUX_DEV_TRANSFORMER,
    "num_layers": 2,
    "num_single_layers": 4,
    "num_attention_heads": 2,
    "joint_attention_dim": 256,
    "pooled_projection_dim": 256,
}
TINY_VAE = {**FLUX_DEV_VAE, "block_out_channels": [32, 32, 64, 64], "layers_per_block": 1, "sample_size": 128}
TINY_CLIP = {
    **CLIP_L_TEXT,
    "vocab_size": 1024,
    "hidden_size": 256,
    "intermediate_size": 1024,
    "projection_dim": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}
TINY_T5 = {
    **T5_XXL_ENCODER,
    "vocab_size": 1024,
    "d_model": 256,
    "d_kv": 64,
    "d_ff": 1024,
    "num_layers": 4,
    "num_heads": 4,
}

# The mini model (trained by quantlab.train_mini): the tiny model's widths (multiples of 256, so every
# backend's blocks apply) with fewer blocks, reading 4-channel latents packed 2×2 (16 features); an
# autoencoder with three resolution levels, 64×64 pixels <-> 16×16×4 latents; no guidance embedding and
# no resolution-dependent shift. Its trained weights are in quantlab/data/mini.
MINI_TRANSFORMER = {**TINY_TRANSFORMER, "in_channels": 16, "num_layers": 1, "num_single_layers": 3,
                    "guidance_embeds": False}
MINI_VAE = {**FLUX_DEV_VAE, "down_block_types": ["DownEncoderBlock2D"] * 3,
            "up_block_types": ["UpDecoderBlock2D"] * 3, "block_out_channels": [32, 64, 64], "layers_per_block": 1,
            "latent_channels": 4, "sample_size": 64, "scaling_factor": 1.0, "shift_factor": 0.0}
MINI_SCHEDULER = {**FLUX_DEV_SCHEDULER, "shift": 1.0, "use_dynamic_shifting": False}
TRAINED_DIR = Path(__file__).parent / "data"
# The embedded models' tokenizers: a byte-level BPE CLIPTokenizer and a Unigram T5TokenizerFast of 1024
# tokens each, trained once with the tokenizers library on a small corpus of prompts (the code that did
# it is models._build_tokenizers in git history, up to commit aa011ce). The embedding tables of the
# full-scale models keep their real, larger size, so every token id is valid for all of them.
TOKENIZERS_DIR = TRAINED_DIR / "tokenizers"

# Bump when the embedded build changes, so that old caches are not reused. Version 2 builds the models
# that fit a CPU on the CPU everywhere, so that their random weights are the same on every machine;
# version 3 copies the shipped tokenizers; version 4 records every file's size and hash, which model_path checks.
EMBEDDED_BUILD_VERSION = 4
# Caches up to this size are hashed on every use; larger ones (flux-dev-shaped: 34 GB) only have their sizes checked.
HASH_EVERY_USE_BYTES = 256 * 2**20


@dataclass(frozen=True)
class ModelSpec:
    """One entry of the model registry: where the weights come from and how to call the pipeline. Every chapter."""

    name: str
    source: str  # "embedded" (built here, offline) or "hub" (downloaded)
    description: str
    configs: dict[str, dict[str, Any]]
    gated: bool = False
    needs_gpu: bool = False
    height: int = 1024
    width: int = 1024
    steps: int = 50
    guidance_scale: float = 3.5
    max_sequence_length: int = 512
    trained: str | None = None  # a folder of TRAINED_DIR whose components replace the random ones
    # what the chapters ask for by default: a scene the model can draw (a shape caption for the mini model, which
    # learned only those; a prompt of the HF blog's for the others)
    prompt: str = ("Baroque style, a lavish palace interior with ornate gilded ceilings, intricate tapestries, and "
                   "dramatic lighting over a grand staircase.")

    def call_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `FluxPipeline.__call__` that suit this model."""
        return {
            "height": self.height,
            "width": self.width,
            "num_inference_steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "max_sequence_length": self.max_sequence_length,
        }


def _configs(transformer: dict, t5: dict, clip: dict, vae: dict, scheduler: dict) -> dict[str, dict[str, Any]]:
    return {"transformer": transformer, "text_encoder_2": t5, "text_encoder": clip, "vae": vae, "scheduler": scheduler}


_DEV = _configs(FLUX_DEV_TRANSFORMER, T5_XXL_ENCODER, CLIP_L_TEXT, FLUX_DEV_VAE, FLUX_DEV_SCHEDULER)
_SCHNELL = {**_DEV, "transformer": {**FLUX_DEV_TRANSFORMER, "guidance_embeds": False},
            "scheduler": {**FLUX_DEV_SCHEDULER, "shift": 1.0, "use_dynamic_shifting": False}}

MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in [
    ModelSpec("tiny", "embedded", "FLUX.1-dev scaled down to about 17M parameters, random weights, built offline in "
              "seconds", _configs(TINY_TRANSFORMER, TINY_T5, TINY_CLIP, TINY_VAE, FLUX_DEV_SCHEDULER), height=128,
              width=128, steps=4, max_sequence_length=64),
    # held-out prompt accuracy is the same at 10 steps as at 20 (results/10_mini_prompt_accuracy.json)
    ModelSpec("mini", "embedded", "a small FLUX trained on captioned coloured shapes: 64×64 pictures that follow the "
              "prompt", _configs(MINI_TRANSFORMER, TINY_T5, TINY_CLIP, MINI_VAE, MINI_SCHEDULER), height=64, width=64,
              steps=10, guidance_scale=1.0, max_sequence_length=48, trained="mini",
              prompt="a small red circle at the top left on a blue background"),
    ModelSpec("flux-dev-shaped", "embedded", "the real 12B FLUX.1-dev architecture with random weights, generated on "
              "the GPU", _DEV, needs_gpu=True),
    ModelSpec("black-forest-labs/FLUX.1-dev", "hub", "FLUX.1-dev from the Hub (gated: accept the licence and log in)",
              _DEV, gated=True),
    ModelSpec("black-forest-labs/FLUX.1-schnell", "hub", "FLUX.1-schnell from the Hub (no login needed), 4 steps, "
              "no guidance", _SCHNELL, steps=4, guidance_scale=0.0, max_sequence_length=256),
]}


def list_models() -> list[str]:
    """Names of every registered model: what `make course MODEL=...` and the lab's `--model` accept."""
    return list(MODELS)


def get_model(name: str | None = None) -> ModelSpec:
    """The spec for `name`, or for `$QUANTLAB_MODEL`, or for the tiny model. Every chapter."""
    name = name or os.environ.get("QUANTLAB_MODEL") or DEFAULT_MODEL
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}. Valid models: {', '.join(MODELS)}.")
    return MODELS[name]


def cache_dir() -> Path:
    """Where embedded models are saved: `$QUANTLAB_CACHE`, else `~/.cache/quantlab`. Every chapter."""
    return Path(os.environ.get("QUANTLAB_CACHE") or Path.home() / ".cache" / "quantlab")


# ---------------------------------------------------------------------------------------------
# Sizes from configs, on the meta device: no weights are allocated.
# ---------------------------------------------------------------------------------------------


def _instantiate(component: str, config: dict[str, Any]) -> torch.nn.Module:
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    if component == "transformer":
        return FluxTransformer2DModel.from_config(config)
    if component == "vae":
        return AutoencoderKL.from_config(config)
    if component == "text_encoder":
        return CLIPTextModel(CLIPTextConfig(**config))
    if component == "text_encoder_2":
        return T5EncoderModel(T5Config(**config))
    raise ValueError(f"Unknown component {component!r}. Valid components: {', '.join(MODEL_COMPONENTS)}.")


def meta_component(model: str | None, component: str) -> torch.nn.Module:
    """`component` of `model` built from its config on the meta device: real structure, no memory.
    Chapters 00, 01, 02, 05, 06, 07."""
    with torch.device("meta"):
        return _instantiate(component, get_model(model).configs[component])


def component_param_counts(model: str | None = None) -> dict[str, int]:
    """Parameter count of each model component, computed from its config on the meta device. Chapter 00."""
    return {c: sum(p.numel() for p in meta_component(model, c).parameters()) for c in MODEL_COMPONENTS}


def linear_layers(module: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """Every `nn.Linear` inside `module`, by qualified name. Chapters 00, 01."""
    return {name: m for name, m in module.named_modules() if isinstance(m, torch.nn.Linear)}


# ---------------------------------------------------------------------------------------------
# Building the embedded models.
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def _randomize_(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Give every weight a deterministic random value shaped like a trained network's.

    Linear and conv weights are drawn from N(0, 1/fan_in): the bell shape of trained weights,
    which is what NF4 assumes. Embeddings and biases are small, and norm scales stay at 1.
    """

    def fill_(tensor: torch.Tensor, std: float) -> None:
        noise = torch.randn(tensor.shape, generator=generator, device=generator.device, dtype=torch.float32)
        tensor.copy_(noise * std)

    for m in module.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            fill_(m.weight, m.weight[0].numel() ** -0.5)
            if m.bias is not None:
                fill_(m.bias, 0.02)
        elif isinstance(m, torch.nn.Embedding):
            fill_(m.weight, 0.02)


def _build_component(component: str, config: dict, device: str, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    generator = torch.Generator(device=device).manual_seed(seed + MODEL_COMPONENTS.index(component))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # allocate in the final dtype: the 12B model never exists in fp32
    try:
        with torch.device(device):
            module = _instantiate(component, config)
    finally:
        torch.set_default_dtype(previous)
    _randomize_(module, generator)
    return module.eval()


def build_component(name: str | None, component: str, device: str = "cpu", dtype: torch.dtype = torch.bfloat16,
                    seed: int = 0) -> torch.nn.Module:
    """`component` of embedded model `name` in memory: the random weights its folder holds when built on `device`.
    The lab's speed runs (quantlab.lab.speed)."""
    spec = get_model(name)
    if spec.source != "embedded":
        raise ValueError(f"{spec.name!r} is downloaded from the Hub, not built. Embedded models: {_embedded_names()}.")
    return _build_component(component, spec.configs[component], device, dtype, seed)


def build_embedded_model(name: str, path: str | os.PathLike, seed: int = 0, device: str | None = None) -> Path:
    """Build embedded model `name` from its configs with random weights and save it as a FluxPipeline folder.

    The folder is written under a temporary name and renamed at the end, so an interrupted
    build leaves nothing half-written at `path`. Every chapter.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    spec = get_model(name)
    if spec.source != "embedded":
        raise ValueError(f"{name!r} is downloaded from the Hub, not built. Embedded models: {_embedded_names()}.")
    # CPU and CUDA random generators differ, so a model small enough for a CPU is built there on every
    # machine: the mini model's frozen text encoders are the tiny model's, wherever it was trained.
    device = device or ("cuda" if spec.needs_gpu and torch.cuda.is_available() else "cpu")
    if spec.needs_gpu and not device.startswith("cuda"):
        raise ModelUnavailableError(
            f"{name!r} is generated on a CUDA GPU (it holds 16.9B parameters, 34 GB in bf16), and this "
            "machine has none. Use QUANTLAB_MODEL=tiny on a CPU."
        )
    trained = _trained_folder(spec)
    with atomic_output(path) as staging:
        # the shipped tokenizers: training them again is not deterministic (tie-breaking varies with the
        # machine's threads), and the mini model's transformer was trained on these token ids
        shutil.copytree(TOKENIZERS_DIR / "clip", staging / "tokenizer")
        shutil.copytree(TOKENIZERS_DIR / "t5", staging / "tokenizer_2")
        FlowMatchEulerDiscreteScheduler.from_config(spec.configs["scheduler"]).save_pretrained(staging / "scheduler")
        for component in MODEL_COMPONENTS:
            if trained is not None and (trained / component).is_dir():  # trained weights, as they were saved
                shutil.copytree(trained / component, staging / component)
                continue
            module = _build_component(component, spec.configs[component], device, torch.bfloat16, seed)
            module.save_pretrained(staging / component, max_shard_size="5GB")
            del module
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        _write_model_index(staging)
        found = [f for f in sorted(staging.rglob("*")) if f.is_file()]
        hashed = sum(f.stat().st_size for f in found) <= HASH_EVERY_USE_BYTES  # 34 GB would take minutes
        files = {f.relative_to(staging).as_posix(): {"bytes": f.stat().st_size, "sha256": _sha256(f) if hashed else None}
                 for f in found}
        (staging / MANIFEST).write_text(json.dumps(
            {"model": name, "seed": seed, "build_version": EMBEDDED_BUILD_VERSION, "files": files}, indent=2))
    return Path(path)


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


# What a build records about itself, in the model's folder: the model, seed, build version, and every file's
# size and (for a cache below HASH_EVERY_USE_BYTES) its SHA-256.
MANIFEST = "quantlab.json"


def verify_cache(path: str | os.PathLike, hashes: bool | None = None) -> str | None:
    """Why the embedded model folder at `path` is not what its build wrote, or None when it is (chapter 00).

    Sizes are always checked; hashes too when `hashes` is True, or, by default, when the folder is smaller than
    `HASH_EVERY_USE_BYTES`. A missing folder, manifest or file, another size or another hash are each named.
    """
    path = Path(path)
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError) as error:
        return f"its manifest {MANIFEST} is missing or unreadable ({type(error).__name__})"
    if hashes is None:
        hashes = sum(entry["bytes"] for entry in files.values()) <= HASH_EVERY_USE_BYTES
    hashes = hashes and all(entry["sha256"] for entry in files.values())  # a large build records sizes only
    for name, entry in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != entry["bytes"]:
            return f"{name} is {size:,} bytes, and its build wrote {entry['bytes']:,} (truncated or overwritten)"
        if hashes and _sha256(file) != entry["sha256"]:
            return f"{name} does not hash to what its build wrote (corrupt)"
    return None


def _write_model_index(folder: Path) -> None:
    import diffusers

    index = {
        "_class_name": "FluxPipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def _embedded_names() -> str:
    return ", ".join(n for n, s in MODELS.items() if s.source == "embedded")


def _trained_folder(spec: ModelSpec) -> Path | None:
    """Where `spec`'s trained components are, checked: None for a model with random weights only."""
    if spec.trained is None:
        return None
    folder = TRAINED_DIR / spec.trained
    missing = [c for c in ("transformer", "vae") if not (folder / c / "diffusion_pytorch_model.safetensors").is_file()]
    if missing:
        raise ModelUnavailableError(
            f"The trained weights of {spec.name!r} are missing from {folder} ({', '.join(missing)}). They ship with "
            f"quantlab: reinstall it (pip install -e .), or train them with `python -m quantlab.train_mini`. "
            f"QUANTLAB_MODEL=tiny needs no trained weights.")
    return folder


def _trained_fingerprint(spec: ModelSpec) -> str:
    """A short hash of the trained weights, so that a cache built from older ones is not reused."""
    import hashlib

    folder = _trained_folder(spec)
    digest = hashlib.sha256()
    for file in sorted(folder.rglob("*")):
        if file.is_file():
            digest.update(file.relative_to(folder).as_posix().encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()[:10]


def _embedded_path(name: str, seed: int) -> Path:
    spec = get_model(name)
    trained = f"-{_trained_fingerprint(spec)}" if spec.trained else ""
    return cache_dir() / f"{name}-v{EMBEDDED_BUILD_VERSION}{trained}-seed{seed}"


def model_path(name: str | None = None, seed: int = 0) -> str:
    """What to pass to `from_pretrained` for `name`: a cached local folder, or a Hub repo id.

    Embedded models are built on first use, and their files checked against what the build recorded
    on every use (`verify_cache`): a damaged cache (a killed copy, a full disk) is rebuilt, with a line
    saying so. Hub models are checked before anything is downloaded: a gated model needs a token, and the Hub must be reachable unless the
    model is already in the local Hugging Face cache. Every chapter.
    """
    spec = get_model(name)
    if spec.source != "embedded":
        return check_hub_access(spec)
    path = _embedded_path(spec.name, seed)
    remove_stale_partials(path.parent)  # what killed builds left, before anything else is written
    if not path.exists():
        build_embedded_model(spec.name, path, seed=seed)
        return str(path)
    damage = verify_cache(path)
    if damage:
        if spec.needs_gpu and not torch.cuda.is_available():
            raise ModelUnavailableError(
                f"The cached {spec.name} at {path} is damaged: {damage}. It is rebuilt on a CUDA GPU, and this "
                f"machine has none: delete {path} and run this again on a GPU machine.")
        print(f"quantlab: the cached {spec.name} at {path} is damaged ({damage}); rebuilding it.", file=sys.stderr)
        build_embedded_model(spec.name, path, seed=seed)
    return str(path)


def check_hub_access(spec: ModelSpec) -> str:
    """Return `spec.name` if it can be loaded here, else raise `ModelUnavailableError` saying what to do.
    Every chapter."""
    from huggingface_hub import auth_check, snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError

    instead = "Use black-forest-labs/FLUX.1-schnell (no login needed) or QUANTLAB_MODEL=tiny (offline)."
    try:
        snapshot_download(spec.name, local_files_only=True)
        return spec.name  # already downloaded: loads offline
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}
    if offline:
        raise ModelUnavailableError(
            f"{spec.name} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set, so it cannot be "
            f"downloaded. Unset HF_HUB_OFFLINE on a machine with network, or use QUANTLAB_MODEL=tiny."
        )
    try:
        auth_check(spec.name)
    except GatedRepoError as error:
        raise ModelUnavailableError(
            f"{spec.name} is gated and this machine has no token with access to it. Accept the licence on "
            f"its Hub page, then run `hf auth login` (or set HF_TOKEN). {instead}"
        ) from error
    except HfHubHTTPError as error:
        raise ModelUnavailableError(f"The Hub refused {spec.name}: {error}. {instead}") from error
    except Exception as error:
        if not _is_network_error(error):
            raise
        raise ModelUnavailableError(
            f"Cannot reach the Hugging Face Hub to download {spec.name} ({type(error).__name__}). "
            "Check the network, or use QUANTLAB_MODEL=tiny, which is built offline."
        ) from error
    return spec.name


def _is_network_error(error: BaseException) -> bool:
    """True for a refused connection, a failed DNS lookup or a timeout, whichever HTTP client raised it."""
    names = {cls.__name__ for cls in type(error).__mro__}
    return isinstance(error, (OSError, TimeoutError)) or bool(
        names & {"ConnectError", "NetworkError", "TransportError", "TimeoutException", "ConnectionError"}
    )
