"""Loading FLUX.1-dev with little host RAM: the recipes a free Colab T4 runs, measured stage by stage.

A free Colab runtime has a T4 (15 GiB, compute capability 7.5: fp16, no bf16, no fp8) and about
12.7 GB of host RAM, and the usual way to lose it is to load FLUX.1-dev on the CPU first. Every
recipe here keeps the weights off the host: each component goes straight to the GPU
(`device_map=device`), the transformer is quantized while it loads, and where T5 does not fit beside
the transformer the prompt is encoded first and the text encoders are freed.

A `ColabRecipe` is the code a learner types, split into stages; `generate` runs exactly that code,
stage by stage, and measures each stage: peak GPU memory (reserved and allocated), peak host memory
(VmRSS and RssAnon, sampled every 20 ms, and VmHWM), and the time of every denoising step.
`t4_estimate` says what a T4 would roughly take per step. On a GPU machine the command line runs
each recipe in a fresh process and writes the rows:

    python -m quantlab.lowram --model flux-dev-shaped --recipes nf4-encode-then-free nf4-t5-nf4 \
        --vram-gib 15 --height 1024 --width 1024 --steps 4 --out results/09_colab_t4_sim_flux-dev-shaped.json

Host memory: safetensors files are memory-mapped, so VmRSS also counts file pages that the kernel can
drop at any time. RssAnon counts what it cannot drop, which is what runs a Colab runtime out of
memory, so the 12 GiB verdict uses RssAnon; VmRSS is recorded beside it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from . import env, measure, models
from .recipes import UnsupportedHardwareError

__all__ = [
    "T4_VRAM_GIB",
    "T4_TOTAL_CAPACITY_GIB",
    "COLAB_HOST_LIMIT_GIB",
    "T4_FP16_TFLOPS",
    "T4_BANDWIDTH_GBPS",
    "ColabRecipe",
    "COLAB_RECIPES",
    "ChapterColab",
    "CHAPTER_RECIPES",
    "get_colab_recipe",
    "check_colab_recipe",
    "HostMemorySampler",
    "StagePeak",
    "LowRamResult",
    "generate",
    "save_prequantized",
    "prequantized_dir",
    "T4Estimate",
    "t4_estimate",
    "main",
]

GIB = 1024**3

# The limits every Colab recipe must stay within, and what a T4 is.
T4_VRAM_GIB = 15.0  # what Colab shows ("15 GB"), and the cap of the simulated T4
T4_TOTAL_CAPACITY_GIB = 14.75  # what PyTorch reports as a T4's total memory; the CUDA context takes some of it
COLAB_HOST_LIMIT_GIB = 12.0  # a free runtime has about 12.7 GB (11.8 GiB) of RAM; 12 GiB is the issue's bound
T4_FP16_TFLOPS = 65.0  # dense fp16 tensor-core peak (NVIDIA's T4 datasheet)
T4_BANDWIDTH_GBPS = 320.0  # GDDR6

DEFAULT_PROMPT = "a photo of a cat sitting on a red chair in a sunny room"


# ---------------------------------------------------------------------------------------------
# The recipes: code a learner types, in stages that `generate` runs as they are.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ColabRecipe:
    """A way to run FLUX.1-dev within a T4's 15 GiB and a Colab runtime's 12 GiB of host RAM."""

    name: str
    description: str
    imports: str
    stages: tuple[tuple[str, str], ...]  # (stage, code), run in this order; the last one generates the image
    needs_cuda: bool  # bitsandbytes: diffusers refuses it without a GPU
    transformer_weights: str  # how the transformer is stored: "nf4", "int8" (bitsandbytes), "int8wo" (torchao)
    text_encoder_2_weights: str = "16bit"  # "16bit" or "nf4"
    encode_then_free: bool = True  # the text encoders are freed before the transformer loads
    prequantized: bool = False  # the transformer is read from a checkpoint saved in its quantized form
    save_stage: str | None = None  # code that writes that checkpoint once (prequantized recipes)
    t4_size: int = 1024  # the largest square size measured to fit a T4's 14.25 GiB (results/09_colab_t4_sim_...)

    @property
    def code(self) -> str:
        """The whole recipe as a learner types it: imports, T4 settings, then every stage."""
        settings = _T4_SETTINGS.format(size=self.t4_size).strip()
        if self.prequantized:
            settings += '\nnf4_dir = "flux-dev-nf4"  # where the pre-quantized transformer is saved'
        parts = [self.imports.strip(), "", settings]
        if self.save_stage:
            parts += ["", f"# {_STAGE_TITLES['save']} (or download one saved so)", self.save_stage.strip()]
        for stage, code in self.stages:
            code = code.strip()
            parts += ["", code] if code.startswith("#") else ["", f"# {_STAGE_TITLES[stage]}", code]
        return "\n".join(parts) + "\n"


_T4_SETTINGS = """
model_id = "black-forest-labs/FLUX.1-dev"  # gated: accept the licence and log in (or use FLUX.1-schnell)
device, dtype = "cuda", torch.float16  # a T4 computes in fp16: no bf16, no fp8
prompt = "a photo of a cat sitting on a red chair in a sunny room"
height = width = {size}
steps, guidance_scale, max_sequence_length, seed = 28, 3.5, 512, 0
"""

_STAGE_TITLES = {
    "save": "once: quantize the transformer and save it",
    "encode": "encode the prompt with CLIP and T5 on the GPU, then free them",
    "load_transformer": "load the transformer, quantized while it loads, straight to the GPU",
    "load": "load every component, quantized while it loads, straight to the GPU",
    "generate": "generate",
}

_IMPORTS = """
import gc

import torch
from diffusers import {names}
"""

_ENCODE = """
text_pipe = FluxPipeline.from_pretrained(model_id, transformer=None, vae=None, dtype=dtype, device_map=device)
with torch.inference_mode():
    prompt_embeds, pooled_prompt_embeds, _ = text_pipe.encode_prompt(
        prompt, prompt_2=None, max_sequence_length=max_sequence_length)
del text_pipe  # CLIP and T5 leave the GPU before the transformer arrives
gc.collect()
torch.cuda.empty_cache()
"""

_LOAD_TRANSFORMER = """
transformer = FluxTransformer2DModel.from_pretrained(
    {source}, subfolder="transformer", dtype=dtype, device_map=device{quantization})
pipe = FluxPipeline.from_pretrained(
    model_id, transformer=transformer, text_encoder=None, text_encoder_2=None, dtype=dtype).to(device)
"""

_GENERATE_FROM_EMBEDS = """
image = pipe(
    prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds, height=height, width=width,
    num_inference_steps=steps, guidance_scale=guidance_scale, generator=torch.Generator("cpu").manual_seed(seed),
).images[0]
"""

_SAVE_NF4 = """
transformer = FluxTransformer2DModel.from_pretrained(
    model_id, subfolder="transformer", dtype=dtype, device_map=device,
    quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype))
# one file (the default max_shard_size): diffusers 0.42 looks for each weight's NF4 statistics in the weight's
# own shard, and smaller shards split them apart
transformer.save_pretrained(f"{nf4_dir}/transformer")
del transformer
gc.collect()
torch.cuda.empty_cache()
"""

_LOAD_ALL_NF4 = """
quantization_config = PipelineQuantizationConfig(
    quant_backend="bitsandbytes_4bit",
    quant_kwargs={"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": dtype},
    components_to_quantize=["transformer", "text_encoder_2"],
)
pipe = FluxPipeline.from_pretrained(model_id, quantization_config=quantization_config, dtype=dtype,
                                    device_map=device)
"""

_GENERATE_FROM_PROMPT = """
image = pipe(
    prompt, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance_scale,
    max_sequence_length=max_sequence_length, generator=torch.Generator("cpu").manual_seed(seed),
).images[0]
"""

_NF4_CONFIG = """,
    quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)"""
_INT8_CONFIG = """,
    quantization_config=BitsAndBytesConfig(load_in_8bit=True)"""
_INT8WO_CONFIG = """,
    quantization_config=TorchAoConfig(Int8WeightOnlyConfig())"""


def _encode_then_free(name: str, description: str, quantization: str, weights: str, names: str,
                      extra_imports: str = "", **kwargs) -> ColabRecipe:
    load = _LOAD_TRANSFORMER.format(source="model_id", quantization=quantization)
    return ColabRecipe(
        name, description, _IMPORTS.format(names=names) + extra_imports,
        (("encode", _ENCODE), ("load_transformer", load), ("generate", _GENERATE_FROM_EMBEDS)),
        needs_cuda=weights in ("nf4", "int8"), transformer_weights=weights, **kwargs)


COLAB_RECIPES: dict[str, ColabRecipe] = {r.name: r for r in [
    _encode_then_free(
        "nf4-encode-then-free",
        "CLIP and T5 in fp16 encode the prompt on the GPU and are freed; then the transformer is quantized to NF4 "
        "(bitsandbytes) while it loads, straight to the GPU, and the VAE joins it in fp16",
        _NF4_CONFIG, "nf4", "BitsAndBytesConfig, FluxPipeline, FluxTransformer2DModel"),
    _encode_then_free(
        "int8-encode-then-free",
        "as nf4-encode-then-free, with the transformer in bitsandbytes LLM.int8() (load_in_8bit=True): twice the "
        "memory of NF4 and slower, but closer to fp16",
        _INT8_CONFIG, "int8", "BitsAndBytesConfig, FluxPipeline, FluxTransformer2DModel"),
    ColabRecipe(
        "nf4-t5-nf4",
        "one PipelineQuantizationConfig quantizes the transformer and T5 to NF4 while they load; every component "
        "stays on the GPU, so the pipeline takes a prompt as usual (T5's feed-forward output layers stay in fp32, "
        "as transformers keeps them for fp16)",
        _IMPORTS.format(names="FluxPipeline, PipelineQuantizationConfig"),
        (("load", _LOAD_ALL_NF4), ("generate", _GENERATE_FROM_PROMPT)),
        needs_cuda=True, transformer_weights="nf4", text_encoder_2_weights="nf4", encode_then_free=False,
        t4_size=512),
    ColabRecipe(
        "nf4-prequantized",
        "as nf4-encode-then-free, but the NF4 transformer is saved once with save_pretrained and read back from "
        "that checkpoint (6.3 GiB instead of 22 GiB to download and read; diffusers/FLUX.1-dev-bnb-4bit on the Hub "
        "is such a checkpoint). Loading it needs no quantization_config: the checkpoint's config carries it",
        _IMPORTS.format(names="BitsAndBytesConfig, FluxPipeline, FluxTransformer2DModel"),
        (("encode", _ENCODE),
         ("load_transformer", "# load the saved NF4 transformer straight to the GPU: its config says how it is "
                              "quantized" + _LOAD_TRANSFORMER.format(source="nf4_dir", quantization="")),
         ("generate", _GENERATE_FROM_EMBEDS)),
        needs_cuda=True, transformer_weights="nf4", prequantized=True, save_stage=_SAVE_NF4),
    _encode_then_free(
        "torchao-int8wo-encode-then-free",
        "as nf4-encode-then-free, with the transformer in torchao int8 weight-only (TorchAoConfig("
        "Int8WeightOnlyConfig()), the config-object API), quantized on the GPU as it loads; runs on a CPU too",
        _INT8WO_CONFIG, "int8wo", "FluxPipeline, FluxTransformer2DModel, TorchAoConfig",
        extra_imports="from torchao.quantization import Int8WeightOnlyConfig\n"),
]}


class ChapterColab(NamedTuple):
    """What the Colab copy of a chapter runs at its end, and why."""

    recipes: tuple[str, ...]
    reason: str


# Read by the Colab generator (quantlab/colab.py), which ends each chapter's copy with these recipes.
CHAPTER_RECIPES: dict[str, ChapterColab] = {
    "00_tour": ChapterColab(
        ("nf4-encode-then-free",),
        "the tour's bf16 baseline needs bf16 (a T4 has none) and 36 GiB of GPU memory, and loaded in fp16 on the CPU "
        "first, its 31 GiB of weights would pass through host RAM: NF4 with the prompt encoded first is the same "
        "pipeline made to fit"),
    "01_bitsandbytes": ChapterColab(
        ("nf4-encode-then-free", "nf4-prequantized", "int8-encode-then-free"),
        "the chapter's own backend: NF4 and LLM.int8() quantized while loading, and the pre-quantized NF4 "
        "checkpoint saved and read back"),
    "02_gguf": ChapterColab(
        ("nf4-encode-then-free",),
        "GGUF needs a separate download (a community .gguf of FLUX.1-dev), and from_single_file holds the file's "
        "tensors in host RAM (peak host RSS 15.2 GiB for Q4_1, results/07); NF4 stands in"),
    "03_torchao": ChapterColab(
        ("torchao-int8wo-encode-then-free",),
        "the chapter's own backend: int8 weight-only runs on a T4 (the float8 configs need compute capability 8.9)"),
    "04_quanto": ChapterColab(
        ("nf4-encode-then-free",),
        "Quanto quantizes on the CPU while loading, so the whole transformer passes through host RAM (peak host RSS "
        "44.6 GiB for int8, results/04); NF4 from bitsandbytes quantizes on the GPU instead"),
    "05_memory": ChapterColab(
        ("nf4-encode-then-free",),
        "model and sequential offloading park the components in host RAM (17 to 38 GiB while generating, "
        "results/05); encoding the prompt and freeing T5 is the memory recipe that fits 12 GiB"),
    "06_speed": ChapterColab(
        ("nf4-encode-then-free",),
        "the chapter's fp8 and bf16 recipes need compute capability 8.9 and 8.0; a T4 (7.5) runs the NF4 pipeline, "
        "and its time per step is beside the T4 estimate"),
    "07_compare": ChapterColab(
        ("nf4-encode-then-free", "torchao-int8wo-encode-then-free"),
        "the comparison at T4 scale: one recipe of each backend that fits a T4 and 12 GiB of host RAM"),
}


def get_colab_recipe(name: str | ColabRecipe) -> ColabRecipe:
    """The Colab recipe called `name`; `ValueError` listing the valid names if there is none."""
    if isinstance(name, ColabRecipe):
        return name
    if name not in COLAB_RECIPES:
        raise ValueError(f"Unknown Colab recipe {name!r}. Valid Colab recipes: {', '.join(COLAB_RECIPES)}.")
    return COLAB_RECIPES[name]


def check_colab_recipe(recipe: str | ColabRecipe, device: str = "cuda", dtype: torch.dtype = torch.float16,
                       model: str | None = None) -> ColabRecipe:
    """Raise before anything loads if `recipe` cannot run here in `dtype`; return the recipe."""
    recipe = get_colab_recipe(recipe)
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dtype {dtype} is not a compute dtype for FLUX: use torch.float16 (a T4), torch.bfloat16 "
                         "or torch.float32.")
    kind = str(device).split(":")[0]
    if kind not in ("cuda", "cpu"):
        raise ValueError(f"Unknown device {device!r}. Valid devices: 'cuda', 'cuda:N', 'cpu'.")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UnsupportedHardwareError(
            f"device={device!r} was asked for, but PyTorch sees no CUDA GPU here. On Colab: Runtime > Change runtime "
            "type > T4 GPU. On a CPU: device='cpu' with the tiny model and torchao-int8wo-encode-then-free.")
    if recipe.needs_cuda and kind != "cuda":
        raise UnsupportedHardwareError(
            f"Colab recipe {recipe.name!r} needs a CUDA GPU: diffusers refuses bitsandbytes without one ('No GPU "
            "found. A GPU is needed for quantization.'). On a CPU use torchao-int8wo-encode-then-free.")
    if kind == "cuda":
        info = env.device_info(device)
        if dtype == torch.bfloat16 and not info.bf16:
            raise UnsupportedHardwareError(
                f"bf16 needs compute capability 8.0+, and {info.label} lacks it. Use dtype=torch.float16.")
    if model in models.MODELS and models.MODELS[model].needs_gpu and kind != "cuda":
        raise UnsupportedHardwareError(f"Model {model!r} is built and run on a CUDA GPU. Use the tiny model on a CPU.")
    return recipe


# ---------------------------------------------------------------------------------------------
# Measuring: host memory sampled by a thread, GPU memory and time per stage.
# ---------------------------------------------------------------------------------------------


class HostMemorySampler:
    """Peak host memory of this process, per stage: VmRSS and RssAnon read every `interval_s` by a thread.

    Use as a context manager and set `stage` as the work moves on; `peaks_gib(stage)` gives (VmRSS,
    RssAnon) maxima. `hwm_gib` is the kernel's own exact VmRSS peak (VmHWM) at exit, which a sampler cannot
    miss; there is no such counter for RssAnon. Works where /proc/self/status exists (Linux).
    """

    def __init__(self, interval_s: float = 0.02):
        self.interval_s = interval_s
        self.stage = "start"
        self._peaks: dict[str, list[int]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.hwm_gib: float | None = None
        self.samples = 0

    @property
    def available(self) -> bool:
        """Whether this system reports VmRSS and RssAnon."""
        return len(measure.read_status_kib("VmRSS", "RssAnon")) == 2

    def sample(self) -> tuple[int, int] | None:
        """Read VmRSS and RssAnon now (KiB) and fold them into the current stage's peaks."""
        values = measure.read_status_kib("VmRSS", "RssAnon")
        if len(values) < 2:
            return None
        rss, anon = values["VmRSS"], values["RssAnon"]
        peak = self._peaks.setdefault(self.stage, [0, 0])
        peak[0], peak[1] = max(peak[0], rss), max(peak[1], anon)
        self.samples += 1
        return rss, anon

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> HostMemorySampler:
        if not self.available:
            raise RuntimeError("HostMemorySampler reads /proc/self/status (VmRSS, RssAnon), which this system lacks.")
        measure.reset_peak_host_rss()  # restart VmHWM, so that it covers this block only
        self.sample()
        self._thread = threading.Thread(target=self._run, daemon=True, name="host-memory-sampler")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()
        hwm = measure.read_status_kib("VmHWM").get("VmHWM")
        self.hwm_gib = None if hwm is None else hwm * 1024 / GIB

    def peaks_gib(self, stage: str | None = None) -> tuple[float, float]:
        """(VmRSS, RssAnon) peak in GiB, of one stage or (`stage=None`) of all of them."""
        if stage is not None and stage not in self._peaks:
            raise KeyError(f"No samples for stage {stage!r}. Stages: {', '.join(self._peaks)}.")
        peaks = [self._peaks[stage]] if stage is not None else list(self._peaks.values())
        return max(p[0] for p in peaks) * 1024 / GIB, max(p[1] for p in peaks) * 1024 / GIB

    @property
    def stages(self) -> list[str]:
        """The stages sampled, in order."""
        return list(self._peaks)


@dataclass
class StagePeak:
    """What one stage took: seconds, and peak GPU (reserved, allocated) and host (VmRSS, RssAnon) memory."""

    seconds: float
    gpu_reserved_gib: float | None
    gpu_allocated_gib: float | None
    host_rss_gib: float
    host_anon_gib: float


@dataclass
class LowRamResult:
    """One `generate` run: the image, the time per step and what each stage took."""

    recipe: str
    model: str
    device: str  # "cuda", "cuda:N" or "cpu"; rows carry the device's name
    dtype: str
    height: int | None  # None for the saving step of a prequantized recipe
    width: int | None
    steps: int | None
    image: Any = None
    load_s: float | None = None  # from the first stage to the pipeline ready (a "save" stage left out)
    s_per_step: float | None = None  # median of the timed steps, each one synchronized
    step_times_s: list[float] = field(default_factory=list)
    peak_gpu_reserved_gib: float | None = None  # torch.cuda.max_memory_reserved(): what the card must hold
    peak_gpu_allocated_gib: float | None = None  # torch.cuda.max_memory_allocated(): live tensors alone
    peak_host_rss_gib: float | None = None  # VmRSS sampled: file-backed pages of mapped safetensors included
    peak_host_anon_gib: float | None = None  # RssAnon sampled: what cannot be dropped (the 12 GiB verdict)
    peak_host_hwm_gib: float | None = None  # VmHWM: the kernel's exact VmRSS peak
    host_anon_baseline_gib: float | None = None  # RssAnon before the first stage (imports, CUDA context)
    mem_after_load_gib: float | None = None
    weights_bytes: int | None = None
    vram_limit_gib: float | None = None
    stages: dict[str, StagePeak] = field(default_factory=dict)
    error: str | None = None
    failed_stage: str | None = None

    def verdict(self, host_limit_gib: float = COLAB_HOST_LIMIT_GIB, vram_limit_gib: float = T4_VRAM_GIB) -> dict:
        """Whether the run stayed within `host_limit_gib` of RssAnon and `vram_limit_gib` of reserved GPU memory.

        On a CPU there is no GPU memory to judge: `vram_ok` is None there, and only host RAM counts.
        """
        host_ok = self.peak_host_anon_gib is not None and self.peak_host_anon_gib <= host_limit_gib
        on_gpu = torch.device(self.device).type == "cuda"
        vram_ok = (self.peak_gpu_reserved_gib is not None and self.peak_gpu_reserved_gib <= vram_limit_gib
                   if on_gpu else None)
        return {"host_limit_gib": host_limit_gib, "vram_limit_gib": vram_limit_gib if on_gpu else None,
                "host_ok": host_ok, "vram_ok": vram_ok,
                "passed": host_ok and vram_ok is not False and self.error is None,
                "host_verdict_uses": "RssAnon (file-backed pages of memory-mapped safetensors can be dropped)"}

    def to_row(self, notes: str = "", host_limit_gib: float = COLAB_HOST_LIMIT_GIB,
               vram_limit_gib: float = T4_VRAM_GIB) -> measure.Measurement:
        """A `measure.Measurement` row (device, versions, date), with the stages and the verdict in `extra`."""
        row = measure.new_row(
            self.model, self.recipe, self.device, height=self.height, width=self.width, steps=self.steps,
            mem_after_load_gib=self.mem_after_load_gib, peak_gpu_mem_gib=self.peak_gpu_reserved_gib,
            peak_host_rss_gib=self.peak_host_rss_gib, weights_bytes=self.weights_bytes,
            ms_per_step=None if self.s_per_step is None else self.s_per_step * 1000, repeats=1, notes=notes)
        row.extra.update(
            dtype=self.dtype, load_s=self.load_s, step_times_s=self.step_times_s,
            peak_gpu_allocated_gib=self.peak_gpu_allocated_gib, peak_host_anon_gib=self.peak_host_anon_gib,
            peak_host_hwm_gib=self.peak_host_hwm_gib, host_anon_baseline_gib=self.host_anon_baseline_gib,
            vram_cap_gib=self.vram_limit_gib, stages={name: asdict(s) for name, s in self.stages.items()},
            error=self.error, failed_stage=self.failed_stage,
            peak_host_rss_method="VmRSS and RssAnon from /proc/self/status every 20 ms; VmHWM at the end",
            **self.verdict(host_limit_gib, vram_limit_gib))
        return row


class _Stages:
    """Moves the run from stage to stage: closes the last one's GPU peaks, time and host peaks."""

    def __init__(self, sampler: HostMemorySampler, cuda: bool):
        self.sampler, self.cuda = sampler, cuda
        self.stages: dict[str, StagePeak] = {}
        self.current: str | None = None
        self._started = 0.0

    def enter(self, stage: str | None) -> None:
        if self.current is not None:
            self._close()
        self.current = stage
        self._started = time.perf_counter()
        if stage is not None:
            self.sampler.stage = stage
            self.sampler.sample()

    def _close(self) -> None:
        reserved = allocated = None
        if self.cuda:
            torch.cuda.synchronize()
            reserved, allocated = torch.cuda.max_memory_reserved() / GIB, torch.cuda.max_memory_allocated() / GIB
            torch.cuda.reset_peak_memory_stats()
        self.sampler.sample()
        rss, anon = self.sampler.peaks_gib(self.current)
        seconds = time.perf_counter() - self._started
        self.stages[self.current] = StagePeak(seconds, reserved, allocated, rss, anon)


class _StepHooks:
    """Forward hooks that move the stages inside a pipeline call and time each transformer step."""

    def __init__(self, pipe, stages: _Stages):
        self.stages, self.timing, self.step_times = stages, False, []
        self._start = 0.0
        self._handles = [pipe.transformer.register_forward_pre_hook(self._step_starts),
                         pipe.transformer.register_forward_hook(self._step_ends)]
        if getattr(pipe, "vae", None) is not None:
            self._handles.append(pipe.vae.decoder.register_forward_pre_hook(self._stage("decode")))
        if getattr(pipe, "text_encoder", None) is not None:  # the pipeline encodes the prompt itself
            self._handles.append(pipe.text_encoder.register_forward_pre_hook(self._stage("encode")))

    def _stage(self, name: str):
        def hook(module, args):
            if self.timing and self.stages.current != name:
                self.stages.enter(name)
        return hook

    def _step_starts(self, module, args):
        if self.timing:
            if self.stages.current != "denoise":
                self.stages.enter("denoise")
            measure.synchronize("cuda" if self.stages.cuda else "cpu")
            self._start = time.perf_counter()

    def _step_ends(self, module, args, output):
        if self.timing:
            measure.synchronize("cuda" if self.stages.cuda else "cpu")
            self.step_times.append(time.perf_counter() - self._start)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def prequantized_dir(model: str, dtype: torch.dtype = torch.float16) -> Path:
    """Where `nf4-prequantized` keeps the NF4 transformer of `model`: under the quantlab cache."""
    safe = str(model).strip("/").replace("/", "--")
    return models.cache_dir() / f"{safe}-nf4-{str(dtype).removeprefix('torch.')}"


def _resolve_model(model: str, seed: int = 0) -> tuple[str, str, dict[str, Any]]:
    """(name, what from_pretrained takes, pipeline call settings) for a registry name, a folder or a Hub id."""
    if model in models.MODELS:
        spec = models.get_model(model)
        return spec.name, models.model_path(spec.name, seed=seed), spec.call_kwargs()
    if Path(model).is_dir() or "/" in model:
        if Path(model).is_dir() and not (Path(model) / "model_index.json").exists():
            raise ValueError(f"{model} has no model_index.json: pass a FluxPipeline folder, a Hub id or one of "
                             f"{', '.join(models.MODELS)}.")
        return model, model, models.MODELS["black-forest-labs/FLUX.1-dev"].call_kwargs()
    raise ValueError(f"Unknown model {model!r}. Valid models: {', '.join(models.MODELS)}; or a FluxPipeline "
                     "folder or Hub id.")


def _namespace(recipe: ColabRecipe, path: str, prompt: str, height: int, width: int, steps: int, seed: int,
               device: str, dtype: torch.dtype, call: dict[str, Any], nf4_dir: Path) -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": f"quantlab.lowram:{recipe.name}"}
    exec(compile(recipe.imports, f"<{recipe.name}:imports>", "exec"), namespace)  # noqa: S102 (our own code)
    namespace.update(model_id=path, device=device, dtype=dtype, prompt=prompt, height=height, width=width,
                     steps=steps, guidance_scale=call["guidance_scale"],
                     max_sequence_length=call["max_sequence_length"], seed=seed, nf4_dir=str(nf4_dir))
    return namespace


def _run_stage(recipe: ColabRecipe, stage: str, code: str, namespace: dict[str, Any]) -> None:
    exec(compile(textwrap.dedent(code), f"<{recipe.name}:{stage}>", "exec"), namespace)  # noqa: S102


def _has_checkpoint(folder: Path) -> bool:
    return (folder / "transformer" / "config.json").is_file()


def _setup(model: str, recipe: str | ColabRecipe, device: str, dtype: torch.dtype, vram_limit_gib: float | None,
           seed: int):
    """Every check, then the model path: nothing is loaded before the checks pass."""
    recipe = check_colab_recipe(recipe, device, dtype, model)
    cuda = torch.device(device).type == "cuda"
    if vram_limit_gib is not None:
        if not cuda:
            raise ValueError("vram_limit_gib caps a CUDA GPU's memory; on a CPU leave it out.")
        index = torch.device(device).index or 0
        total = torch.cuda.get_device_properties(index).total_memory / GIB
        if not 0 < vram_limit_gib <= total:
            raise ValueError(f"vram_limit_gib={vram_limit_gib} must be within this GPU's {total:.1f} GiB.")
    name, path, call = _resolve_model(model, seed)
    if vram_limit_gib is not None:
        torch.cuda.set_per_process_memory_fraction(vram_limit_gib / total, index)
    return recipe, cuda, name, path, call


def generate(model: str, recipe: str | ColabRecipe, prompt: str = DEFAULT_PROMPT, *, height: int = 1024,
             width: int = 1024, steps: int | None = None, seed: int = 0, device: str = "cuda",
             dtype: torch.dtype = torch.float16, vram_limit_gib: float | None = None, warmup_steps: int = 1,
             nf4_dir: str | os.PathLike | None = None) -> LowRamResult:
    """Run Colab recipe `recipe` on `model` stage by stage, exactly as its `code` reads, and measure each stage.

    `model` is a quantlab model name, a FluxPipeline folder or a Hub id. `vram_limit_gib` caps what PyTorch
    may take from the GPU (`torch.cuda.set_per_process_memory_fraction`, which holds for the rest of the
    process), to play a smaller card. A warm-up
    image of `warmup_steps` steps precedes the timed one. A prequantized recipe saves its checkpoint to
    `nf4_dir` first if none is there (the "save" stage). On an error the exception carries the stages
    measured so far as `error.lowram_result`.
    """
    recipe, cuda, name, path, call = _setup(model, recipe, device, dtype, vram_limit_gib, seed)
    steps = steps or call["num_inference_steps"]
    nf4_dir = Path(nf4_dir) if nf4_dir is not None else prequantized_dir(name, dtype)
    result = LowRamResult(recipe.name, name, device, str(dtype).removeprefix("torch."), height, width, steps,
                          vram_limit_gib=vram_limit_gib)
    namespace = _namespace(recipe, path, prompt, height, width, steps, seed, device, dtype, call, nf4_dir)
    stage_list = list(recipe.stages)
    if recipe.prequantized and not _has_checkpoint(nf4_dir):
        stage_list.insert(0, ("save", recipe.save_stage))
    loading = tuple(stage for stage, _ in stage_list[:-1] if stage != "save")
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    hooks, sampler = None, HostMemorySampler()
    try:
        with sampler:
            result.host_anon_baseline_gib = sampler.peaks_gib("start")[1]
            stages = _Stages(sampler, cuda)
            try:
                for stage, code in stage_list[:-1]:
                    stages.enter(stage)
                    _run_stage(recipe, stage, code, namespace)
                stages.enter("warmup")
                result.weights_bytes = sum(measure.component_weights_bytes(namespace["pipe"]).values())
                result.mem_after_load_gib = torch.cuda.memory_allocated() / GIB if cuda else result.weights_bytes / GIB
                namespace["pipe"].set_progress_bar_config(disable=True)
                stage, code = stage_list[-1]
                if warmup_steps:
                    _run_stage(recipe, stage, code, {**namespace, "steps": warmup_steps})
                hooks = _StepHooks(namespace["pipe"], stages)
                hooks.timing = True
                stages.enter("generate")  # becomes encode, denoise and decode as the pipeline reaches them
                _run_stage(recipe, stage, code, namespace)
                stages.enter(None)
            except BaseException as error:
                result.error, result.failed_stage = f"{type(error).__name__}: {error}"[:2000], stages.current
                stages.enter(None)
                _finish(result, stages, sampler, hooks, namespace, cuda, loading)
                error.lowram_result = result
                raise
            _finish(result, stages, sampler, hooks, namespace, cuda, loading)
    finally:
        result.peak_host_hwm_gib = sampler.hwm_gib  # the kernel's VmRSS peak, a failed run's too
    return result


def _finish(result: LowRamResult, stages: _Stages, sampler: HostMemorySampler, hooks: _StepHooks | None,
            namespace: dict[str, Any], cuda: bool, loading: tuple[str, ...] = ()) -> None:
    """Fold the stages into `result`, then free everything the recipe's code made."""
    result.stages = stages.stages
    if hooks is not None:
        hooks.remove()
        result.step_times_s = hooks.step_times
        if hooks.step_times:
            result.s_per_step = measure.TimingStats.of(hooks.step_times).median_s
    result.image = namespace.get("image")
    done = list(result.stages.values())
    if done:
        result.peak_host_rss_gib = max(s.host_rss_gib for s in done)
        result.peak_host_anon_gib = max(s.host_anon_gib for s in done)
        if cuda:
            result.peak_gpu_reserved_gib = max(s.gpu_reserved_gib for s in done)
            result.peak_gpu_allocated_gib = max(s.gpu_allocated_gib for s in done)
    if loading and all(name in result.stages for name in loading):
        result.load_s = sum(result.stages[name].seconds for name in loading)
    namespace.clear()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def save_prequantized(model: str, nf4_dir: str | os.PathLike | None = None, *, device: str = "cuda",
                      dtype: torch.dtype = torch.float16, vram_limit_gib: float | None = None,
                      seed: int = 0) -> LowRamResult:
    """Quantize `model`'s transformer to NF4 and save it, as `nf4-prequantized`'s save stage reads; measured."""
    recipe = COLAB_RECIPES["nf4-prequantized"]
    recipe, cuda, name, path, call = _setup(model, recipe, device, dtype, vram_limit_gib, seed)
    nf4_dir = Path(nf4_dir) if nf4_dir is not None else prequantized_dir(name, dtype)
    result = LowRamResult(f"{recipe.name}:save", name, device, str(dtype).removeprefix("torch."), None, None, None,
                          vram_limit_gib=vram_limit_gib)
    namespace = _namespace(recipe, path, "", None, None, None, seed, device, dtype, call, nf4_dir)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sampler = HostMemorySampler()
    try:
        with sampler:
            result.host_anon_baseline_gib = sampler.peaks_gib("start")[1]
            stages = _Stages(sampler, cuda)
            try:
                stages.enter("save")
                _run_stage(recipe, "save", recipe.save_stage, namespace)
                stages.enter(None)
            except BaseException as error:
                result.error, result.failed_stage = f"{type(error).__name__}: {error}"[:2000], stages.current
                stages.enter(None)
                _finish(result, stages, sampler, None, namespace, cuda)
                error.lowram_result = result
                raise
            _finish(result, stages, sampler, None, namespace, cuda)
    finally:
        result.peak_host_hwm_gib = sampler.hwm_gib
    result.load_s = result.stages["save"].seconds  # quantizing while loading, then writing
    result.weights_bytes = measure.folder_bytes(nf4_dir / "transformer")
    return result


# ---------------------------------------------------------------------------------------------
# What a T4 would take: an estimate from FLOPs and bytes.
# ---------------------------------------------------------------------------------------------

# Bytes read and written per transformer Linear weight in one step. With many tokens (4,096 image + 512
# text at 1024x1024), bitsandbytes' 4-bit and torchao's int8 weight-only layers dequantize each weight to
# fp16 (read the packed weight, write 2 bytes) and cuBLAS reads the 2 bytes again. LLM.int8() reads its
# int8 weight once in an int8 matmul, and quantizes the activations (left out here).
_BYTES_PER_WEIGHT = {"nf4": 0.5 + 4 / 64 + 2 + 2, "int8": 1.0, "int8wo": 1.0 + 4 / 4096 + 2 + 2, "fp16": 2.0}

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


def t4_estimate(recipe: str | ColabRecipe = "nf4-encode-then-free", height: int = 1024, width: int = 1024,
                model: str = "flux-dev-shaped", text_tokens: int = 512,
                achieved: dict[str, float] | None = None) -> T4Estimate:
    """Estimate a T4's time per denoising step for `recipe` from FLOPs and bytes moved (see `T4_ACHIEVED`)."""
    from . import speed

    recipe = get_colab_recipe(recipe)
    achieved = {**T4_ACHIEVED, **(achieved or {})}
    transformer = models.meta_component(model, "transformer")
    tflop = speed.transformer_tflop_per_step(transformer, height, width, text_tokens)
    linear_params = sum(m.weight.numel() for m in models.linear_layers(transformer).values())
    other_params = sum(p.numel() for p in transformer.parameters()) - linear_params
    gb_moved = (linear_params * _BYTES_PER_WEIGHT[recipe.transformer_weights] + other_params * 2) / 1e9
    compute_peak_s = tflop["linear_tflop"] / T4_FP16_TFLOPS + tflop["attention_tflop"] / T4_FP16_TFLOPS
    compute_s = (tflop["linear_tflop"] / (T4_FP16_TFLOPS * achieved["linear"])
                 + tflop["attention_tflop"] / (T4_FP16_TFLOPS * achieved["attention"]))
    memory_s = gb_moved / (T4_BANDWIDTH_GBPS * achieved["bandwidth"])
    assumptions = (f"Assumed: fp16 matmuls at {achieved['linear']:.0%} of the T4's {T4_FP16_TFLOPS:g} TFLOP/s, "
                   f"attention at {achieved['attention']:.0%}, weights streamed at {achieved['bandwidth']:.0%} of "
                   f"{T4_BANDWIDTH_GBPS:g} GB/s, {_BYTES_PER_WEIGHT[recipe.transformer_weights]:.2f} bytes moved per "
                   "Linear weight; activations' traffic, kernel launches and the VAE are left out."
                   + (" LLM.int8()'s activation quantization and outlier columns are left out too: on the simulated "
                      "T4 it took 2.2 times NF4's time per step (results/09)." if recipe.transformer_weights == "int8"
                      else ""))
    return T4Estimate(recipe.name, height, width, tflop["linear_tflop"], tflop["attention_tflop"], gb_moved,
                      compute_s, memory_s, compute_s + memory_s,
                      compute_peak_s + gb_moved / T4_BANDWIDTH_GBPS, assumptions)


# ---------------------------------------------------------------------------------------------
# The command line: each recipe in a fresh process, so that each one's host peak is its own.
# ---------------------------------------------------------------------------------------------


def _child(args: argparse.Namespace) -> int:
    """One recipe in this process; its row (or the record of its failure) goes to `args.row_out`."""
    dtype = getattr(torch, args.dtype)
    kwargs = dict(device=args.device, dtype=dtype, vram_limit_gib=args.vram_gib, seed=args.seed)
    notes = f"{args.model}, {args.height}x{args.width}, {args.steps} steps after a {args.warmup_steps}-step warm-up"
    try:
        if args.save_only:
            result = save_prequantized(args.model, args.nf4_dir, **kwargs)
            notes = f"{args.model}: the NF4 transformer quantized while loading and saved with save_pretrained"
        else:
            result = generate(args.model, args.one, args.prompt, height=args.height, width=args.width,
                              steps=args.steps, warmup_steps=args.warmup_steps, nf4_dir=args.nf4_dir, **kwargs)
        code = 0
    except Exception as error:  # out of GPU memory, say: the row records where and what was measured until then
        result = getattr(error, "lowram_result", None)
        if result is None:
            raise
        code = 3
    row = result.to_row(notes, args.host_limit_gib, args.vram_gib or T4_VRAM_GIB)
    if result.s_per_step is not None:
        row.extra["t4_estimate_s_per_step"] = t4_estimate(args.one, args.height, args.width).s_per_step
    measure.save_rows([row], args.row_out)
    print(_describe(row.__dict__), flush=True)
    return code


def _describe(row: dict) -> str:
    def fmt(value, spec="6.2f"):
        return "   n/a" if value is None else format(value, spec)

    extra = row["extra"]
    size = "save" if row["height"] is None else f"{row['height']}x{row['width']}"
    return (f"{row['recipe']:<32} {size:>9}  host anon {fmt(extra.get('peak_host_anon_gib'))} GiB, "
            f"VmRSS {fmt(row.get('peak_host_rss_gib'))} (HWM {fmt(extra.get('peak_host_hwm_gib'))}), GPU reserved "
            f"{fmt(row.get('peak_gpu_mem_gib'))} GiB, {fmt(row.get('ms_per_step'), '7.1f')} ms/step, "
            f"load {fmt(extra.get('load_s'), '5.1f')} s: {'PASS' if extra.get('passed') else 'FAIL'}"
            + (f" ({extra['error'][:160]} in {extra.get('failed_stage')})" if extra.get("error") else ""))


def _memory_cgroup(limit_gib: float) -> tuple[Path | None, str]:
    """A cgroup v2 child of this process's cgroup with memory.max = `limit_gib`, if the memory controller is
    already delegated to children here; else None and why. Nothing else is moved or changed."""
    root = Path("/sys/fs/cgroup")
    try:
        lines = [line for line in Path("/proc/self/cgroup").read_text().splitlines() if line.startswith("0::")]
        if not lines:
            return None, "this machine has cgroup v1, not v2"
        parent = root / lines[0].removeprefix("0::").lstrip("/")
        if "memory" not in (parent / "cgroup.subtree_control").read_text().split():
            return None, f"the memory controller is not enabled for children of {parent}"
        child = parent / f"quantlab-host-limit-{os.getpid()}"
        child.mkdir(exist_ok=True)
        (child / "memory.max").write_text(str(int(limit_gib * GIB)))
        if (child / "memory.swap.max").exists():
            (child / "memory.swap.max").write_text("0")
        return child, f"memory.max = {limit_gib} GiB (cgroup v2 {child}), swap 0"
    except OSError as error:
        return None, f"no writable cgroup v2 memory controller ({type(error).__name__}: {error})"


def _cgroup_report(cgroup: Path) -> dict[str, Any]:
    report: dict[str, Any] = {}
    try:
        if (cgroup / "memory.peak").exists():
            report["memory_peak_gib"] = int((cgroup / "memory.peak").read_text()) / GIB
        events = dict(line.split() for line in (cgroup / "memory.events").read_text().splitlines())
        report["oom_kill"] = int(events.get("oom_kill", 0))
    except OSError as error:
        report["error"] = str(error)
    return report


def _run_child(argv: list[str], timeout_s: float, cgroup: Path | None) -> tuple[int, str]:
    def join_cgroup():
        (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    try:
        done = subprocess.run([sys.executable, "-m", "quantlab.lowram", *argv], capture_output=True, text=True,
                              timeout=timeout_s, preexec_fn=join_cgroup if cgroup else None)
        return done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as error:
        output = (error.stdout or b"") + (error.stderr or b"")
        return -9, (output.decode(errors="replace") if isinstance(output, bytes) else output) + \
            f"\n[killed after {timeout_s:.0f} s]"


def _append_rows(path: Path, rows: list[dict]) -> None:
    existing = json.loads(path.read_text()) if path.exists() else []
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(existing + rows, indent=2, default=measure._json_default) + "\n")


def _failure_row(args: argparse.Namespace, recipe: str, code: int, output: str) -> dict:
    row = measure.new_row(args.model, recipe, "cpu" if args.device == "cpu" else args.device, height=args.height,
                          width=args.width, steps=args.steps, notes="the process ended without writing a row")
    lines = [line for line in output.splitlines() if line.strip()]
    row.extra.update(error=f"exit code {code}: " + " | ".join(lines[-3:])[-1500:], passed=False,
                     host_limit_gib=args.host_limit_gib, vram_limit_gib=args.vram_gib)
    return asdict(row)


def main(argv: list[str] | None = None) -> int:
    """Command line: run Colab recipes, each in a fresh process, and append their rows to a JSON file."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="flux-dev-shaped", help=f"one of: {', '.join(models.MODELS)}; or a folder")
    parser.add_argument("--recipes", nargs="+", help=f"Colab recipes: {', '.join(COLAB_RECIPES)}")
    parser.add_argument("--out", help="a .json file; rows already in it are kept")
    parser.add_argument("--vram-gib", type=float, help="cap the GPU memory PyTorch may take (a T4: 15)")
    parser.add_argument("--host-limit-gib", type=float, default=COLAB_HOST_LIMIT_GIB,
                        help="the host RAM verdict (RssAnon); enforced too where a cgroup v2 memory controller allows")
    parser.add_argument("--enforce-host-limit", action="store_true",
                        help="run each recipe in a cgroup with memory.max = --host-limit-gib, where possible")
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup-steps", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--nf4-dir", help="where nf4-prequantized saves and reads its NF4 transformer")
    parser.add_argument("--timeout-s", type=float, default=900, help="per recipe process")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # inside a child process: run this recipe
    parser.add_argument("--save-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--row-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        return _child(args)
    if not args.recipes or not args.out:
        parser.error("--recipes and --out are needed")
    for name in args.recipes:
        check_colab_recipe(name, args.device, getattr(torch, args.dtype), args.model)  # every check before any load
    cgroup, how = _memory_cgroup(args.host_limit_gib) if args.enforce_host_limit else (None, "not asked for")
    print(f"host limit {args.host_limit_gib} GiB: enforced: {how}" if cgroup else
          f"host limit {args.host_limit_gib} GiB: verdict only ({how})", flush=True)
    common = ["--model", args.model, "--height", str(args.height), "--width", str(args.width), "--steps",
              str(args.steps), "--warmup-steps", str(args.warmup_steps), "--seed", str(args.seed), "--prompt",
              args.prompt, "--device", args.device, "--dtype", args.dtype, "--host-limit-gib",
              str(args.host_limit_gib)]
    common += ["--vram-gib", str(args.vram_gib)] if args.vram_gib else []
    common += ["--nf4-dir", args.nf4_dir] if args.nf4_dir else []
    failures = 0
    for name in args.recipes:
        runs = [(name, ["--save-only"])] if get_colab_recipe(name).prequantized else []
        runs.append((name, []))
        for recipe_name, flags in runs:
            with tempfile.TemporaryDirectory() as tmp:
                row_out = Path(tmp) / "row.json"
                started = time.perf_counter()
                code, output = _run_child(["--one", recipe_name, *flags, "--row-out", str(row_out), *common],
                                          args.timeout_s, cgroup)
                rows = json.loads(row_out.read_text()) if row_out.exists() else \
                    [_failure_row(args, recipe_name + (":save" if flags else ""), code, output)]
            for row in rows:
                row["extra"].update(process_s=time.perf_counter() - started, exit_code=code,
                                    host_limit_enforced=cgroup is not None, host_limit_how=how)
                if cgroup is not None:
                    row["extra"]["cgroup"] = _cgroup_report(cgroup)
                    _reset_cgroup_peak(cgroup)
                print(_describe(row), flush=True)
                failures += not row["extra"].get("passed", False)
            _append_rows(Path(args.out), rows)
    if cgroup is not None:
        try:
            cgroup.rmdir()
        except OSError:
            pass
    print(f"wrote {args.out}: {failures} of the rows above failed", flush=True)
    return 0


def _reset_cgroup_peak(cgroup: Path) -> None:
    try:  # kernels 6.12+ reset memory.peak when it is written to
        (cgroup / "memory.peak").write_text("0")
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(main())
