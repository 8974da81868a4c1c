"""bitsandbytes on any device: diffusers' own path on CUDA, and the same algorithm on a CPU.

diffusers 0.42 refuses bitsandbytes without a GPU ("No GPU found. A GPU is needed for
quantization."), although bitsandbytes 0.50 itself quantizes and multiplies on a CPU. On a CPU,
`quantize_modules` does what diffusers' quantizer does while loading, minus the GPU check: it
swaps every `nn.Linear` for bitsandbytes' `Linear8bitLt` or `Linear4bit` with diffusers' own
`replace_with_bnb_linear`, then wraps each weight in `Int8Params` or `Params4bit` and moves it to
the device, which is the moment bitsandbytes quantizes it. On CUDA, `load_transformer` calls
`FluxTransformer2DModel.from_pretrained(..., quantization_config=...)` exactly as a learner would.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
import torch

__all__ = [
    "LoadedModel",
    "DIFFUSERS_PATH",
    "CPU_MODULES_PATH",
    "load_transformer",
    "quantize_modules",
    "dequantize_modules",
    "quantize_linear",
    "quantized_linears",
    "code_values",
    "outlier_column_fraction",
    "layer_errors",
]

DIFFUSERS_PATH = "diffusers from_pretrained(quantization_config=BitsAndBytesConfig(...)) on CUDA"
CPU_MODULES_PATH = ("bitsandbytes Linear8bitLt/Linear4bit on the CPU, swapped in with diffusers' "
                    "replace_with_bnb_linear (diffusers itself refuses bitsandbytes without a GPU)")


@dataclass
class LoadedModel:
    """A quantized model and a plain-words record of which code path produced it. Chapter 01."""

    model: torch.nn.Module
    path: str


def _skip_list(config) -> list[str]:
    skip = config.llm_int8_skip_modules or []
    return list(skip) if isinstance(skip, (list, tuple)) else [skip]


def quantize_modules(model: torch.nn.Module, config, device: str = "cpu") -> torch.nn.Module:
    """Quantize `model`'s Linear layers in place with bitsandbytes, as diffusers' loader would.

    `config` is diffusers' (or transformers') `BitsAndBytesConfig`. Modules named in
    `llm_int8_skip_modules` stay as they are. Chapter 01.
    """
    import bitsandbytes as bnb
    from diffusers.quantizers.bitsandbytes.utils import replace_with_bnb_linear

    if not (config.load_in_8bit or config.load_in_4bit):
        raise ValueError("The BitsAndBytesConfig quantizes nothing: set load_in_8bit=True or load_in_4bit=True.")
    originals = {name: p.detach().to("cpu") for name, p in model.named_parameters()}
    was_training = model.training
    replace_with_bnb_linear(model, modules_to_not_convert=_skip_list(config), quantization_config=config)
    # the new layers start in training mode, and bitsandbytes' 8-bit layer in training mode skips
    # int8 activations altogether; put them in the model's mode, as diffusers' loader does
    model.train(was_training)
    for name, module in model.named_modules():
        if not isinstance(module, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)):
            continue
        old = module.weight
        cls = bnb.nn.Int8Params if isinstance(module, bnb.nn.Linear8bitLt) else bnb.nn.Params4bit
        # the same construction as diffusers' create_quantized_param: keep the module's quantization
        # settings (old.__dict__), then move to the device, where bitsandbytes quantizes
        module._parameters["weight"] = cls(originals[f"{name}.weight"], requires_grad=False, **old.__dict__).to(device)
        if module.bias is not None:
            module._parameters["bias"] = torch.nn.Parameter(originals[f"{name}.bias"].to(device), requires_grad=False)
        if isinstance(module, bnb.nn.Linear4bit):
            # Keep the layout that CUDA uses. On a CPU with AVX512-BF16, bitsandbytes 0.50.2 would
            # repack each 4-bit weight at its first forward pass and expand nested scales back to
            # fp32, so double quantization would save nothing at run time; and the inverse it
            # applies before saving or dequantizing leaves non-nested scales transposed, so
            # dequantize() would return wrong weights. The arithmetic is the same either way.
            module.support_avx512bf16_for_cpu = False
    model.to(device)  # the parameters that stayed unquantized
    model.quantlab_bnb_config = config
    return model


def dequantize_modules(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every bitsandbytes Linear in `model` with an `nn.Linear` holding the dequantized weight.

    Models loaded by diffusers get `model.dequantize()`; models quantized by `quantize_modules` go
    through the same function diffusers calls inside it, `dequantize_and_replace`. Chapter 01.
    """
    if getattr(model, "hf_quantizer", None) is not None:
        return model.dequantize()
    from diffusers.quantizers.bitsandbytes.utils import dequantize_and_replace

    config = getattr(model, "quantlab_bnb_config", None)
    if config is None:
        raise ValueError("This model was not quantized with bitsandbytes, so there is nothing to dequantize.")
    model = dequantize_and_replace(model, _skip_list(config), quantization_config=config)
    del model.quantlab_bnb_config
    return model


def load_transformer(path: str, config, dtype: torch.dtype, device: str, subfolder: str = "transformer"
                     ) -> LoadedModel:
    """A bitsandbytes-quantized `FluxTransformer2DModel`: diffusers' path on CUDA, `quantize_modules` on a CPU.
    Chapter 01."""
    from diffusers import FluxTransformer2DModel

    if torch.device(device).type == "cuda":
        model = FluxTransformer2DModel.from_pretrained(
            path, subfolder=subfolder, quantization_config=config, dtype=dtype, device_map=device
        )
        return LoadedModel(model, DIFFUSERS_PATH)
    model = FluxTransformer2DModel.from_pretrained(path, subfolder=subfolder, dtype=dtype)
    return LoadedModel(quantize_modules(model, config, device), CPU_MODULES_PATH)


def quantized_linears(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every bitsandbytes Linear (8-bit or 4-bit) in `model`, by name. Chapter 01."""
    import bitsandbytes as bnb

    return {n: m for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))}


def quantize_linear(linear: torch.nn.Linear, config, device: str | None = None) -> torch.nn.Module:
    """A quantized copy of one `nn.Linear`, for measuring that layer's own error. Chapter 01 (exercise 2)."""
    holder = torch.nn.Module()
    holder.layer = copy.deepcopy(linear)
    return quantize_modules(holder, config, device or str(linear.weight.device)).layer


def code_values(quant_type: str) -> torch.Tensor:
    """The 16 values a 4-bit code can stand for ('nf4' or 'fp4'), before scaling by the block's absmax. Chapter 01."""
    from bitsandbytes.functional import get_4bit_type

    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"Unknown 4-bit type {quant_type!r}. Valid types: nf4, fp4.")
    return get_4bit_type(quant_type, device="cpu").float().sort().values


def outlier_column_fraction(activations: torch.Tensor, threshold: float) -> float:
    """Fraction of feature columns (last dimension) in which some value exceeds `threshold` in magnitude.

    LLM.int8() multiplies those columns in 16-bit and the rest in int8. Chapter 01.
    """
    columns = activations.reshape(-1, activations.shape[-1]).abs().amax(dim=0)
    return float((columns > threshold).float().mean())


def layer_errors(model: torch.nn.Module, linear_inputs: dict[str, torch.Tensor], config) -> list[dict]:
    """Each Linear's own relative output error when only that layer is quantized with `config`.

    `linear_inputs` holds each layer's real input (from `ql.quality.capture_linear_inputs`). Chapter 01
    (exercise 2).
    """
    from . import quality

    rows = []
    for name, x in linear_inputs.items():
        layer = model.get_submodule(name)
        quantized = quantize_linear(layer, config)
        with torch.no_grad():
            x = x.to(layer.weight.device, layer.weight.dtype)
            error = quality.relative_error(quantized(x), layer(x))
        rows.append({"layer": name, "in_features": layer.in_features, "out_features": layer.out_features,
                     "relative_error": error})
    return rows
