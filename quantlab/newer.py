"""Chapter 08: the five newer backends' checkpoints and checks (SDNQ, NVIDIA ModelOpt, BFL, AutoRound, Nunchaku Lite).

`write_bfl_file` writes a BFL fp8r single-file checkpoint with diffusers' own helper and `check_bfl_file`
refuses a file that is truncated or lacks its scales, before loading; `autoround_quantize` quantizes a
pipeline's transformer with the auto-round library, offline; `check_prequantized` names the package a saved
checkpoint needs before diffusers tries to load it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import logging
import os
import re
import struct
from pathlib import Path

import torch

from .files import atomic_output

__all__ = ["QUANT_METHOD_PACKAGES", "BFLFileError", "write_bfl_file", "check_bfl_file", "autoround_quantize",
           "check_prequantized", "environment_checks", "copy_without"]

# A saved checkpoint's quantization_config.quant_method, and the package that loads it.
QUANT_METHOD_PACKAGES = {"sdnq": "sdnq", "modelopt": "modelopt", "auto-round": "auto_round",
                         "nunchaku_lite": "kernels", "bitsandbytes": "bitsandbytes", "quanto": "optimum.quanto"}
# BFL's own script quantizes the blocks' Linears only: attention and MLPs of the double- and single-stream blocks.
_BLOCK_LINEAR = re.compile(r"(single_)?transformer_blocks\.\d+\.(attn|ff|ff_context|proj_mlp|proj_out)\b.*\.weight")


class BFLFileError(ValueError):
    """A BFL single-file checkpoint that diffusers would fail on, or silently misread. Chapters 02, 07, 08."""


def write_bfl_file(transformer: torch.nn.Module, path: str | os.PathLike) -> Path:
    """Write `transformer` as a BFL fp8r single file: each block Linear's weight in float8 e4m3 with a float32 scale
    per row (`diffusers.quantizers.bfl.utils.quantize_fp8r`), everything else as it is, in diffusers' names.
    Chapter 08."""
    from diffusers.quantizers.bfl.utils import quantize_fp8r
    from safetensors.torch import save_file

    tensors = {}
    for name, tensor in transformer.state_dict().items():
        if _BLOCK_LINEAR.fullmatch(name) and tensor.ndim == 2:
            tensors[name], tensors[name.removesuffix("weight") + "weight_scale"] = quantize_fp8r(tensor)
        else:
            tensors[name] = tensor.contiguous()
    with atomic_output(path) as partial:
        save_file(tensors, partial, metadata={"format": "pt", "quantization": "fp8r"})
    return Path(path)


def check_bfl_file(path: str | os.PathLike) -> dict[str, int]:
    """Check a BFL fp8r file's header before diffusers reads it; returns {dtype: tensors}.

    Refused with `BFLFileError`: a file shorter than its header says (truncated), a file with no `.weight_scale`
    (not fp8r or nvfp4), and float8 weights without their scale, which diffusers would load as raw codes.
    Chapters 02, 07, 08.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No BFL checkpoint at {path}.")
    with open(path, "rb") as f:
        head = f.read(8)
        size = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        try:
            header = json.loads(f.read(size)) if 0 < size < 2**28 else None
        except ValueError:
            header = None
    if not isinstance(header, dict):
        raise BFLFileError(f"{path} has no readable safetensors header: it is not a checkpoint, or it is cut short. "
                           "Write or download it again.")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    end = 8 + size + max((v["data_offsets"][1] for v in tensors.values()), default=0)
    if path.stat().st_size < end:
        raise BFLFileError(f"{path} is {path.stat().st_size:,} bytes and its header says {end:,}: truncated. Write or "
                           "download it again.")
    if not any(name.endswith(".weight_scale") for name in tensors):
        raise BFLFileError(f"{path} has no .weight_scale tensors, so it is not a BFL fp8r or nvfp4 checkpoint.")
    unscaled = [n for n, v in tensors.items() if v["dtype"] == "F8_E4M3" and n.endswith(".weight")
                and n.removesuffix("weight") + "weight_scale" not in tensors]
    if unscaled:
        raise BFLFileError(f"{path}: {len(unscaled)} float8 weights have no .weight_scale ({unscaled[0]}, ...): "
                           "diffusers would use their raw fp8 codes as weights. Write the file again.")
    counts: dict[str, int] = {}
    for v in tensors.values():
        counts[v["dtype"]] = counts.get(v["dtype"], 0) + 1
    return counts


def copy_without(path: str | os.PathLike, out: str | os.PathLike, drop) -> Path:
    """A copy of the safetensors file `path` at `out`, without the tensors whose name `drop(name)` is true (chapter 08
    damages a BFL file on purpose, to show what `check_bfl_file` refuses)."""
    from safetensors.torch import load_file, save_file

    tensors = {name: t for name, t in load_file(str(path)).items() if not drop(name)}
    with atomic_output(out) as partial:
        save_file(tensors, partial, metadata={"format": "pt"})
    return Path(out)


def autoround_quantize(model_path: str, out: str | os.PathLike, captions: list[str], *, iters: int = 0,
                       call_kwargs: dict | None = None, calibration_steps: int = 4) -> Path:
    """Quantize `model_path`'s transformer to 4-bit weights (W4A16) with auto-round, offline, and save it for diffusers.

    `iters=0` rounds to nearest (auto-round's plain RTN: no data); `iters > 0` runs SignRound on the transformer
    blocks' inputs for the `captions` (a local .tsv: without one auto-round downloads a calibration set), each
    pipeline call `calibration_steps` denoising steps long. The export's weight file is renamed to the name
    diffusers' `from_pretrained` looks for. Chapter 08.
    """
    import gc

    from auto_round import AutoRound, RTNConfig, SignRoundConfig
    from diffusers import FluxPipeline

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = out / "calibration.tsv"  # a .csv would be read as another dataset (AudioCaps)
    table.write_text("id\tcaption\n" + "".join(f"{i}\t{c}\n" for i, c in enumerate(captions)))
    call = dict(call_kwargs or {})
    steps, guidance = call.pop("num_inference_steps", 10), call.pop("guidance_scale", 3.5)
    # each algorithm through its config (the iters= and disable_opt_rtn= keywords work too, with a warning that says
    # so); batch_size=1, which diffusion models need (auto-round warns when it resets a larger one)
    algorithm = RTNConfig(disable_opt_rtn=True) if iters == 0 else SignRoundConfig(iters=iters)
    pipe = FluxPipeline.from_pretrained(model_path, dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)  # SignRound's calibration runs the pipeline once per caption
    gc.freeze()  # auto-round calls gc.collect() after every layer: with what lives now set aside, each takes ms, not 1 s
    try:
        with _quiet_progress_bars():
            AutoRound(pipe, scheme="W4A16", dataset=str(table), nsamples=len(captions), device_map="cpu",
                      batch_size=1, enable_torch_compile=False, guidance_scale=guidance, num_inference_steps=steps,
                      calib_num_inference_steps=calibration_steps, pipeline_call_kwargs=call,
                      alg_configs=algorithm).quantize_and_save(str(out), format="auto_round")
    finally:
        gc.unfreeze()
    folder = out / "transformer"
    for file in folder.glob("model*.safetensors*"):  # auto-round 0.16.1 writes model.safetensors
        file.rename(folder / file.name.replace("model", "diffusion_pytorch_model", 1))
    return out


@contextlib.contextmanager
def _quiet_progress_bars():
    """No progress bars, and no diffusers notice of an empty list, while auto-round works. auto-round draws plain tqdm
    bars that no switch turns off (in a notebook each refresh of one is a line of stderr) and saves through
    transformers, which draws its own; and it casts the pipeline with `.to()`, after which diffusers logs "There are
    modules in ... that should be kept in float32: []" for each component, naming none."""
    import transformers
    from tqdm import std

    init, shown = std.tqdm.__dict__["__init__"], transformers.utils.logging.is_progress_bar_enabled()
    std.tqdm.__init__ = functools.partialmethod(init, disable=True)
    transformers.utils.logging.disable_progress_bar()
    empty = _Matching(r"should be kept in float32: \[\]")
    logging.getLogger("diffusers.models.modeling_utils").addFilter(empty)
    try:
        yield
    finally:
        std.tqdm.__init__ = init
        if shown:
            transformers.utils.logging.enable_progress_bar()
        logging.getLogger("diffusers.models.modeling_utils").removeFilter(empty)


class _Matching(logging.Filter):
    """Drops the log records whose message matches `pattern`."""

    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def check_prequantized(folder: str | os.PathLike, subfolder: str = "transformer") -> str | None:
    """The quant_method a saved checkpoint carries (None for a plain one); `ImportError` naming the package to
    install when the one that loads it is missing, before diffusers reads a weight. Chapters 02, 07, 08."""
    config = Path(folder) / subfolder / "config.json"
    method = json.loads(config.read_text()).get("quantization_config", {}).get("quant_method")
    package = QUANT_METHOD_PACKAGES.get(method)
    if package and importlib.util.find_spec(package.split(".")[0]) is None:
        raise ImportError(f"{config} says its weights were quantized with {method}, and {package} is not installed "
                          f"here: install it (the course pins it in pyproject.toml), then load again.")
    return method


def environment_checks(quantizer: type) -> list[dict[str, object]]:
    """What a diffusers quantizer's `validate_environment` checks, in source order: each `if ...: raise ...` as its
    line, condition, exception and message, read from the installed diffusers (so it shows the checks a machine
    cannot trigger, such as Nunchaku Lite's on a CPU). Chapter 08."""
    import ast
    import inspect
    import textwrap

    method = quantizer.validate_environment
    lines, first = inspect.getsourcelines(method)
    tree = ast.parse(textwrap.dedent("".join(lines)))
    checks = []
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and node.body and isinstance(node.body[0], ast.Raise):
            error = node.body[0].exc
            message = error.args[0] if isinstance(error, ast.Call) and error.args else None
            try:
                text = ast.literal_eval(message) if message is not None else ""
            except ValueError:  # an f-string: show it as written
                text = ast.unparse(message)
            checks.append({"line": first + node.lineno - 1, "if": ast.unparse(node.test),
                           "raises": ast.unparse(error.func if isinstance(error, ast.Call) else error),
                           "message": text})
    return sorted(checks, key=lambda check: check["line"])
