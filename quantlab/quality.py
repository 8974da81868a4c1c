"""How far a quantized model's output moved, and whether it still draws what was asked (every chapter).

Image error (PSNR, SSIM), tensor error (SQNR, relative error), the check that a compiled model computes
what the eager one does, the inputs captured for comparing on identical inputs, and prompt accuracy.
Every figure refuses NaN and infinity: `NonFiniteError` says which component overflowed and what to try.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

__all__ = [
    "NonFiniteError",
    "check_finite",
    "finite_outputs",
    "psnr_db",
    "ssim",
    "sqnr_db",
    "relative_error",
    "CompileCheck",
    "COMPILE_AGREEMENT_DB",
    "compare_compiled",
    "capture_transformer_inputs",
    "capture_linear_inputs",
    "PromptAccuracy",
    "prompt_accuracy",
]


# --- non-finite values -------------------------------------------------------------------------


class NonFiniteError(ValueError):
    """A tensor, image or latent holds NaN or infinity, so no figure computed from it would mean anything.
    Every chapter."""


def check_finite(values, what: str, advice: str | None = None):
    """Return `values` (a tensor or array) if every element is finite; else raise `NonFiniteError` saying what to do.
    Every chapter."""
    finite = torch.isfinite(values).all() if isinstance(values, torch.Tensor) else np.isfinite(values).all()
    if not bool(finite):
        raise NonFiniteError(f"The {what} holds NaN or infinite values, so it cannot be measured. "
                             + (advice or _NONFINITE_ADVICE["weights"]))
    return values


_NONFINITE_ADVICE = {
    "weights": "Check the weights (a corrupt download or a quantization that overflowed), and the dtype: in float16 "
               "FLUX's activations can overflow, so use bf16 where the GPU has it (Ampere or newer) or float32.",
    "transformer": "FLUX's transformer overflows float16 in places: use bf16 where the GPU has it (Ampere or newer), "
                   "or keep the transformer in float32; on a T4, prefer a quantized recipe whose compute dtype the "
                   "chapter tested. If the weights themselves hold NaN, reload them.",
    "text_encoder_2": "T5 overflows in float16: load it in bf16 or float32, or keep its feed-forward output layers "
                      "in float32, as transformers does for T5 unless they are overridden (`_keep_in_fp32_modules`).",
    "vae": "The VAE overflowed: decode in float32 (`pipe.vae.to(torch.float32)`, with the latents cast to match), "
           "or check the transformer's latents, which arrive here.",
}


@contextlib.contextmanager
def finite_outputs(pipe) -> Iterator[None]:
    """Inside the block, a non-finite output of the pipeline's transformer, T5 or VAE raises `NonFiniteError`.

    Every measurement that generates runs inside it: a NaN image is otherwise converted to a black picture and
    measured as one. The error names the component and its dtype, and what to try. Every chapter.
    """
    handles = []

    def watch(name: str):
        def hook(module, args, output):
            first = output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)
            first = getattr(first, "last_hidden_state", first)
            if isinstance(first, torch.Tensor) and not bool(torch.isfinite(first).all()):
                dtype = next((p.dtype for p in module.parameters()), None)
                raise NonFiniteError(f"The {name} (in {dtype}) produced NaN or infinite values. "
                                     + _NONFINITE_ADVICE[name])
        return hook

    for name in ("transformer", "text_encoder_2", "vae"):
        module = getattr(pipe, name, None)
        if name == "vae" and module is not None:
            module = getattr(module, "decoder", module)
        if isinstance(module, torch.nn.Module):
            handles.append(module.register_forward_hook(watch(name)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# --- image error ------------------------------------------------------------------------------


def _as_float_array(image, what: str = "image") -> np.ndarray:
    array = np.asarray(image, dtype=np.float64)
    if array.ndim == 2:
        array = array[..., None]
    check_finite(array, what)
    return array


def psnr_db(image, reference, max_value: float = 255.0) -> float:
    """Peak signal-to-noise ratio of `image` against `reference`, in dB (inf when identical).
    Chapters 00, 01, 02, 05, 07, 08."""
    a, b = _as_float_array(image), _as_float_array(reference, "reference image")
    if a.shape != b.shape:
        raise ValueError(f"Images differ in shape: {a.shape} vs {b.shape}.")
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(max_value**2 / mse))


def ssim(image, reference, max_value: float = 255.0) -> float:
    """Structural similarity (Wang et al. 2004): 11x11 Gaussian window, sigma 1.5, mean over channels.
    Chapters 00, 01, 02, 07, 08."""
    a = torch.from_numpy(_as_float_array(image)).permute(2, 0, 1)[None]
    b = torch.from_numpy(_as_float_array(reference, "reference image")).permute(2, 0, 1)[None]
    if a.shape != b.shape:
        raise ValueError(f"Images differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}.")
    channels = a.shape[1]
    coords = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-(coords**2) / (2 * 1.5**2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :]).expand(channels, 1, 11, 11)

    def blur(x):
        return torch.nn.functional.conv2d(x, window, groups=channels)

    c1, c2 = (0.01 * max_value) ** 2, (0.03 * max_value) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    index = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(index.mean())


def sqnr_db(output: torch.Tensor, reference: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of `output` against `reference`, in dB (inf when equal).

    Raises `NonFiniteError` if either holds a NaN or an infinity: a figure from them would mean nothing.
    Chapters 01, 02, 03, 04, 05, 06, 07, 08.
    """
    ref = check_finite(reference.detach().double().cpu(), "reference output")
    noise = (check_finite(output.detach().double().cpu(), "output") - ref).pow(2).sum()
    return float("inf") if noise == 0 else float(10 * torch.log10(ref.pow(2).sum() / noise))


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    """||output - reference|| / ||reference||, computed in float64; `NonFiniteError` on a NaN or infinity.
    Chapters 01, 02."""
    ref = check_finite(reference.detach().double().cpu(), "reference output")
    return float((check_finite(output.detach().double().cpu(), "output") - ref).norm() / ref.norm())


@dataclass(frozen=True)
class CompileCheck:
    """How far a compiled model's output is from the same model's eager output, and whether that is too far.
    Chapters 01, 02, 03, 06, 07, 08."""

    sqnr_db: float  # compiled against eager
    own_error_db: float | None  # the recipe's own quantization error: eager against bf16, when known
    agrees: bool
    message: str


# A compiled model computes what the eager one does, in another order and with other fused kernels: bf16 rounding
# keeps the two outputs about 30-50 dB apart. Below this, compiling changed the result (chapter 03 shows one).
COMPILE_AGREEMENT_DB = 25.0


def compare_compiled(compiled: torch.Tensor, eager: torch.Tensor, own_error_db: float | None = None) -> CompileCheck:
    """Compare a compiled output with the eager one (chapters 01, 03, 06 and every compiled row of the lab).

    They disagree when their SQNR is below `COMPILE_AGREEMENT_DB`, or, where the recipe's own quantization error
    against bf16 is known, below it less 3 dB: compiling must not add more error than quantizing did.
    """
    sqnr = sqnr_db(compiled, eager)
    floor = COMPILE_AGREEMENT_DB if own_error_db is None else min(COMPILE_AGREEMENT_DB, own_error_db - 3.0)
    agrees = sqnr >= floor
    message = (f"compiled and eager outputs agree (SQNR {sqnr:.1f} dB)" if agrees else
               f"COMPILED OUTPUT DISAGREES WITH EAGER: SQNR {sqnr:.1f} dB, below the {floor:.1f} dB that rounding "
               f"explains" + ("" if own_error_db is None else f" (the recipe's own error is {own_error_db:.1f} dB)")
               + "; do not use this compiled model's figures")
    return CompileCheck(sqnr, own_error_db, agrees, message)


class _StopAfterCapture(Exception):
    pass


def capture_transformer_inputs(pipe, prompt: str, call_kwargs: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """The keyword arguments of the pipeline's first transformer call: real latents, text embeddings, ids.

    The pipeline stops right there, so this costs a prompt encoding, not a generation. Feed the
    result to any transformer with `transformer(**inputs)` to compare outputs on identical inputs.
    Chapters 01, 02, 03, 04, 05, 06, 07, 08.
    """
    captured: dict[str, Any] = {}

    def hook(module, args, kwargs):
        captured.update({k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})
        raise _StopAfterCapture

    handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with finite_outputs(pipe):
            pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), **call_kwargs)
    except _StopAfterCapture:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError("The pipeline never called its transformer, so there was nothing to capture.")
    captured["return_dict"] = False
    return captured


def capture_linear_inputs(model: torch.nn.Module, run: Callable[[], Any],
                          names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """The input of each `nn.Linear` in `model` (or of those in `names`) during `run()`, copied to the CPU.

    Only the first call of each layer is kept. Chapters 01, 03, 08.
    """
    layers = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    if names is not None:
        layers = {n: layers[n] for n in names}
    inputs: dict[str, torch.Tensor] = {}
    handles = []
    for name, layer in layers.items():
        def hook(module, args, name=name):
            inputs.setdefault(name, args[0].detach().to("cpu", copy=True))
        handles.append(layer.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return inputs


# --- prompt accuracy ----------------------------------------------------------------------------


@dataclass
class PromptAccuracy:
    """How many shape pictures matched their captions (`shapes.prompt_accuracy`), with the pictures.
    Chapters 00, 01, 02, 03, 04, 05, 07, 08."""

    accuracy: float
    captions: list[str]
    images: list[Any]

    def __float__(self) -> float:
        return self.accuracy


@torch.no_grad()
def prompt_accuracy(pipe, call_kwargs: dict[str, Any], captions: Sequence[str] | int = 18, seed: int = 0,
                    batch_size: int = 18) -> PromptAccuracy:
    """Generate a picture for each held-out shape caption and score them with the shape detector.

    `captions` is a list of captions, or how many of the mini model's 90 held-out ones to use. The
    pipeline is called with `call_kwargs` (height, width, steps: the model's `call_kwargs()`), a batch of
    captions at a time, each batch from `seed`. The figure is meaningful for the mini model, which was
    trained on these pictures; a random model scores near 0 and the full FLUX.1-dev paints scenes the
    detector was not built for. Chapters 00, 01, 02, 03, 04, 05, 07, 08.
    """
    from . import shapes

    captions = shapes.held_out_captions(captions) if isinstance(captions, int) else list(captions)
    images = []
    with finite_outputs(pipe):
        for start in range(0, len(captions), batch_size):
            generator = torch.Generator("cpu").manual_seed(seed)
            result = pipe(captions[start:start + batch_size], generator=generator, **call_kwargs)
            images += [image.convert("RGB") for image in result.images]
    return PromptAccuracy(shapes.prompt_accuracy([np.asarray(i) for i in images], captions), captions, images)
