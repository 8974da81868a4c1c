"""GGUF files for FLUX transformers: write one in any GGUF type, check one before loading, load it.

`write_gguf` turns any `FluxTransformer2DModel` (the tiny one on a CPU, the 12B one on a GPU) into a
single GGUF file that `FluxTransformer2DModel.from_single_file` loads. Tensor names stay in
diffusers' layout, so diffusers loads them without converting. The block formats come from
`quantlab.gguf_quants`: the gguf package's own quantizers for the legacy types (their torch twin
on a GPU), ggml's reference algorithm for the K-quants.

Which tensors stay in float (`KEEP_IN_FLOAT_RULES`):
- 1-D tensors (biases, RMSNorm scales) stay F32: they are a few thousand values per layer, a
  norm's scale multiplies every activation that passes through it, and ggml keeps them so too;
- the layers at the model's edges stay F16: the patch, text and timestep embedders at the input,
  and `norm_out`/`proj_out` at the output. Every token passes through them once, with nothing
  after them to absorb an error, and in FLUX.1-dev they are 0.5% of the weights;
- a matrix whose rows do not fill whole blocks (32 weights, or 256 for K-quants) stays F16.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch

from . import gguf_quants
from .files import atomic_output
from .recipes import GGUF_TYPES

__all__ = [
    "ARCHITECTURE",
    "GGUF_TYPES",
    "KEEP_IN_FLOAT_RULES",
    "EDGE_LAYER_PREFIXES",
    "GGUFFileError",
    "GGUFFileInfo",
    "TensorPlan",
    "GGUFWriteReport",
    "plan_tensors",
    "write_gguf",
    "inspect_gguf",
    "check_gguf_file",
    "check_architecture",
    "load_transformer",
    "write_model_file",
    "block_layout",
]

ARCHITECTURE = "flux"
# every type quantlab writes (GGUF_TYPES, from the recipes' vocabulary), roughly from the most to the fewest bits
EDGE_LAYER_PREFIXES = ("x_embedder.", "context_embedder.", "time_text_embed.", "norm_out.", "proj_out.")
KEEP_IN_FLOAT_RULES = {
    "1-D tensor (bias or norm scale)": "F32",
    "edge layer (input embedders, norm_out, proj_out)": "F16",
    "rows do not fill whole blocks": "F16",
}
_CONFIG_KEY = "quantlab.transformer_config"


class GGUFFileError(ValueError):
    """A GGUF file that is missing, truncated, corrupt, or for another model. Chapters 02, 07, 08."""


@dataclass
class TensorPlan:
    """How one tensor is stored: its name, shape, GGUF type, and why that type. Chapters 02, 07."""

    name: str
    shape: tuple[int, ...]
    gguf_type: str
    reason: str

    @property
    def n_params(self) -> int:
        return int(np.prod(self.shape))

    @property
    def n_bytes(self) -> int:
        block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[self.gguf_type]]
        return self.n_params // block_size * type_size


@dataclass
class GGUFWriteReport:
    """What `write_gguf` wrote: sizes, speed and the plan for every tensor. Chapters 02, 07."""

    path: Path
    gguf_type: str
    file_bytes: int
    n_params: int
    params_quantized: int
    seconds: float
    tensors: list[TensorPlan] = field(repr=False, default_factory=list)

    @property
    def params_per_s(self) -> float:
        return self.n_params / self.seconds if self.seconds > 0 else float("inf")

    @property
    def bits_per_weight(self) -> float:
        """The whole file, header included, in bits per parameter."""
        return self.file_bytes * 8 / self.n_params

    @property
    def nominal_bits_per_weight(self) -> float:
        """What the type alone costs, scales included, if every tensor had it."""
        return gguf_quants.bits_per_weight(self.gguf_type)


@dataclass
class GGUFFileInfo:
    """What a GGUF file holds, read from its header. Chapters 02, 07, 08."""

    path: Path
    architecture: str | None
    file_bytes: int
    n_tensors: int
    n_params: int
    tensors_per_type: dict[str, int]
    tensor_shapes: dict[str, tuple[int, ...]] = field(repr=False)  # in PyTorch's order, as a state dict has them
    config: dict | None = None


# --------------------------------------------------------------------------- writing


def plan_tensors(shapes: dict[str, tuple[int, ...]], gguf_type: str) -> list[TensorPlan]:
    """The GGUF type of every tensor of a state dict (name -> shape) for a file of `gguf_type`. Chapters 02, 07."""
    _check_type(gguf_type)
    block_size, _ = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[gguf_type]]
    plans = []
    for name, shape in shapes.items():
        shape = tuple(int(size) for size in shape)
        if len(shape) == 1:
            plans.append(TensorPlan(name, shape, "F32", "1-D tensor (bias or norm scale)"))
        elif name.startswith(EDGE_LAYER_PREFIXES):
            plans.append(TensorPlan(name, shape, _float_type_for(gguf_type),
                                    "edge layer (input embedders, norm_out, proj_out)"))
        elif shape[-1] % block_size != 0:
            plans.append(TensorPlan(name, shape, _float_type_for(gguf_type), "rows do not fill whole blocks"))
        else:
            plans.append(TensorPlan(name, shape, gguf_type, "quantized"))
    return plans


def write_gguf(transformer: torch.nn.Module, path: str | os.PathLike, gguf_type: str, *,
               device: str | torch.device | None = None) -> GGUFWriteReport:
    """Write `transformer` (a `FluxTransformer2DModel`) to `path` as a GGUF file of `gguf_type`.

    Tensors are quantized one at a time on `device` (default: where each weight is) and streamed
    to a partial file beside `path` (`files.atomic_output`), which replaces `path` only when complete:
    an interrupted write leaves any earlier file at `path` as it was, and the next write removes the
    partial a killed writer left. Chapters 02, 07.
    """
    _check_type(gguf_type)
    path = Path(path)
    state_dict = transformer.state_dict()
    for name, tensor in state_dict.items():
        if not tensor.is_floating_point():
            raise TypeError(f"{name} is {tensor.dtype}; write_gguf takes a float model, not an already quantized one.")
    plans = plan_tensors({name: tuple(tensor.shape) for name, tensor in state_dict.items()}, gguf_type)

    started = time.perf_counter()
    with atomic_output(path) as partial:
        writer = gguf.GGUFWriter(str(partial), ARCHITECTURE)
        try:
            writer.add_name(type(transformer).__name__)
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            config = getattr(transformer, "config", None)
            if config is not None:
                writer.add_string(_CONFIG_KEY, json.dumps(dict(config), default=str))
            for plan in plans:
                writer.add_tensor_info(plan.name, _stored_shape(plan), np.dtype(np.uint8), plan.n_bytes,
                                       raw_dtype=gguf.GGMLQuantizationType[plan.gguf_type])
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for plan in plans:
                weights = state_dict[plan.name].detach()
                rows = weights.reshape(-1, weights.shape[-1]) if weights.ndim > 1 else weights.reshape(1, -1)
                packed = _encode(rows, plan.gguf_type, device)
                writer.write_tensor_data(np.ascontiguousarray(packed).view(np.uint8).reshape(-1))
        finally:
            writer.close()
    seconds = time.perf_counter() - started
    return GGUFWriteReport(
        path=path,
        gguf_type=gguf_type,
        file_bytes=path.stat().st_size,
        n_params=sum(plan.n_params for plan in plans),
        params_quantized=sum(plan.n_params for plan in plans if plan.gguf_type == gguf_type),
        seconds=seconds,
        tensors=plans,
    )


def _encode(rows: torch.Tensor, gguf_type: str, device) -> np.ndarray:
    if gguf_type == "F32":
        return rows.to("cpu", torch.float32).numpy()
    return gguf_quants.quantize(rows, gguf_type, device=device)


def _stored_shape(plan: TensorPlan) -> tuple[int, ...]:
    # add_tensor_info takes a quantized tensor's shape in bytes, last axis packed
    block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[plan.gguf_type]]
    return (*plan.shape[:-1], plan.shape[-1] // block_size * type_size)


def _float_type_for(gguf_type: str) -> str:
    # a BF16 file keeps its edge layers in BF16; every other type keeps them in F16, as ggml does
    return "BF16" if gguf_type == "BF16" else "F16"


def _check_type(gguf_type: str) -> None:
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"Unknown GGUF type {gguf_type!r}. quantlab writes: {', '.join(GGUF_TYPES)}.")


# --------------------------------------------------------------------------- checking and loading


def inspect_gguf(path: str | os.PathLike) -> GGUFFileInfo:
    """Read a GGUF file's header and tensor table.

    A missing file raises `FileNotFoundError`; a truncated or corrupt one `GGUFFileError`. Chapters 02, 07, 08.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist. Write one with ql.gguf.write_gguf, or check the path.")
    file_bytes = path.stat().st_size
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if len(magic) < 4:
        raise GGUFFileError(f"{path} is empty or truncated ({file_bytes} bytes). Download or write the file again.")
    if magic != b"GGUF":
        raise GGUFFileError(
            f"{path} is not a GGUF file: it starts with {magic!r}, not b'GGUF'. "
            "It may be a safetensors or PyTorch checkpoint, or a download that saved an error page."
        )
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as error:  # gguf raises ValueError, IndexError or struct errors on a damaged file
        raise GGUFFileError(
            f"{path} is truncated or corrupt ({file_bytes} bytes): gguf could not read its header or tensor "
            f"table ({type(error).__name__}: {error}). Download or write the file again."
        ) from error
    end_of_data = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end_of_data > file_bytes:
        raise GGUFFileError(
            f"{path} is truncated: its tensor table needs {end_of_data} bytes and the file has {file_bytes}. "
            "Download or write the file again."
        )
    tensors_per_type: dict[str, int] = {}
    for tensor in reader.tensors:
        name = tensor.tensor_type.name
        tensors_per_type[name] = tensors_per_type.get(name, 0) + 1
    return GGUFFileInfo(
        path=path,
        architecture=_read_string(reader, "general.architecture"),
        file_bytes=file_bytes,
        n_tensors=len(reader.tensors),
        n_params=sum(int(t.n_elements) for t in reader.tensors),
        tensors_per_type=tensors_per_type,
        tensor_shapes={t.name: tuple(int(size) for size in reversed(t.shape.tolist())) for t in reader.tensors},
        config=json.loads(_read_string(reader, _CONFIG_KEY) or "null"),
    )


def check_gguf_file(path: str | os.PathLike, config: str | os.PathLike, subfolder: str = "transformer") -> GGUFFileInfo:
    """Check, before loading, that `path` is a whole GGUF file for the transformer configured in `config`.

    `config` is a model folder (with `subfolder`) or a transformer folder holding `config.json`.
    Raises `FileNotFoundError` for a missing file or config and `GGUFFileError` for a truncated,
    corrupt or mismatched file, naming the file and the problem. Chapter 02.
    """
    config_folder = _config_folder(config, subfolder)
    info = inspect_gguf(path)
    check_architecture(info, config_folder)
    return info


def check_architecture(info: GGUFFileInfo, config_folder: str | os.PathLike) -> None:
    """Raise `GGUFFileError` unless the file `info` describes holds the transformer configured in `config_folder`.
    Chapters 02, 07, 08."""
    from diffusers import FluxTransformer2DModel

    if info.architecture not in (ARCHITECTURE, None):
        raise GGUFFileError(
            f"{info.path} holds a {info.architecture!r} model, not a FLUX transformer ({ARCHITECTURE!r}). "
            "Pick a FLUX.1 GGUF file."
        )
    with torch.device("meta"):
        expected = FluxTransformer2DModel.from_config(FluxTransformer2DModel.load_config(config_folder))
    expected_shapes = {name: tuple(tensor.shape) for name, tensor in expected.state_dict().items()}
    found_shapes = info.tensor_shapes
    if _looks_like_original_flux_layout(found_shapes):
        return  # Black Forest Labs' names (city96's files): diffusers converts them while loading
    missing = sorted(set(expected_shapes) - set(found_shapes))
    unexpected = sorted(set(found_shapes) - set(expected_shapes))
    wrong_shape = sorted(name for name in set(expected_shapes) & set(found_shapes)
                         if expected_shapes[name] != found_shapes[name])
    if missing or unexpected or wrong_shape:
        details = []
        if missing:
            details.append(f"{len(missing)} tensors missing (e.g. {missing[0]})")
        if unexpected:
            details.append(f"{len(unexpected)} tensors unexpected (e.g. {unexpected[0]})")
        if wrong_shape:
            name = wrong_shape[0]
            details.append(f"{len(wrong_shape)} tensors with other shapes (e.g. {name}: file {found_shapes[name]}, "
                           f"config {expected_shapes[name]})")
        raise GGUFFileError(
            f"{info.path} is for a different model than the config in {config_folder}: {'; '.join(details)}. "
            "Use the config of the model the file was written from."
        )


def load_transformer(path: str | os.PathLike, config: str | os.PathLike, *, compute_dtype: torch.dtype = torch.bfloat16,
                     subfolder: str = "transformer"):
    """Check `path`, then load it with `FluxTransformer2DModel.from_single_file` and `GGUFQuantizationConfig`.
    Chapter 02."""
    from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig

    check_gguf_file(path, config, subfolder)
    config_root, config_subfolder = _config_root_and_subfolder(config, subfolder)
    return FluxTransformer2DModel.from_single_file(
        str(path),
        quantization_config=GGUFQuantizationConfig(compute_dtype=compute_dtype),
        config=str(config_root),
        subfolder=config_subfolder,
        torch_dtype=compute_dtype,
    )


def _config_folder(config: str | os.PathLike, subfolder: str) -> Path:
    root, sub = _config_root_and_subfolder(config, subfolder)
    return root / sub if sub else root


def _config_root_and_subfolder(config: str | os.PathLike, subfolder: str) -> tuple[Path, str | None]:
    root = Path(config)
    if (root / subfolder / "config.json").is_file():
        return root, subfolder
    if (root / "config.json").is_file():
        return root, None
    raise FileNotFoundError(
        f"No transformer config at {root / subfolder / 'config.json'} or {root / 'config.json'}. "
        "A GGUF file holds weights only: pass the folder of the model it was written from "
        "(for the tiny model, ql.model_path('tiny')), or the Hub id's local snapshot."
    )


def _looks_like_original_flux_layout(found_shapes: dict[str, tuple[int, ...]]) -> bool:
    return any(name.startswith("double_blocks.0.img_attn.qkv.") for name in found_shapes)


def _read_string(reader: gguf.GGUFReader, key: str) -> str | None:
    field_ = reader.fields.get(key)
    if field_ is None:
        return None
    return bytes(field_.parts[field_.data[0]]).decode("utf-8")


# --------------------------------------------------------------------------- teaching


def block_layout(gguf_type: str) -> list[tuple[str, int, str]]:
    """The fields of one block of `gguf_type` in byte order: (field, bytes, what it holds). Chapter 02."""
    layouts = {
        "Q8_0": [("d", 2, "fp16 scale"), ("qs", 32, "32 int8 codes, one per weight")],
        "Q4_0": [("d", 2, "fp16 scale"), ("qs", 16, "32 4-bit codes, two per byte")],
        "Q4_1": [("d", 2, "fp16 scale"), ("m", 2, "fp16 minimum"), ("qs", 16, "32 4-bit codes, two per byte")],
        "Q4_K": [("d", 2, "fp16 super-block scale of the scales"), ("dmin", 2, "fp16 super-block scale of the mins"),
                 ("scales", 12, "8 sub-block scales and 8 mins, 6 bits each"),
                 ("qs", 128, "256 4-bit codes, two per byte")],
        "Q2_K": [("scales", 16, "16 sub-block scales and mins, 4 bits each"),
                 ("qs", 64, "256 2-bit codes, four per byte"),
                 ("d", 2, "fp16 scale of the scales"), ("dmin", 2, "fp16 scale of the mins")],
        "Q6_K": [("ql", 128, "low 4 bits of 256 codes"), ("qh", 64, "high 2 bits of 256 codes"),
                 ("scales", 16, "16 int8 sub-block scales"), ("d", 2, "fp16 super-block scale")],
    }
    if gguf_type not in layouts:
        raise ValueError(f"block_layout knows {', '.join(layouts)}; {gguf_type!r} is not drawn here.")
    layout = layouts[gguf_type]
    _, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[gguf_type]]
    assert sum(size for _, size, _ in layout) == type_size, gguf_type
    return layout


def write_model_file(model: str | None, gguf_type: str, folder: str | os.PathLike,
                     device: str | None = None) -> tuple[Path, GGUFWriteReport | None]:
    """The GGUF file of `model`'s transformer in `gguf_type` under `folder`, written on `device` first if missing
    (chapters 02 and 07). The file is named after the model's folder (`mini-v4-<hash>-seed0`), so a rebuilt model
    gets a new file rather than a stale one.

    Returns the path and the `GGUFWriteReport` (None when the file was already there).
    """
    from diffusers import FluxTransformer2DModel

    from . import env, models

    spec = models.get_model(model)
    source = models.model_path(spec.name)
    key = Path(source).name if Path(source).is_dir() else spec.name.replace("/", "--")
    path = Path(folder) / f"{key}-{gguf_type}.gguf"
    if path.is_file():
        return path, None
    device = device or env.default_device()
    transformer = FluxTransformer2DModel.from_pretrained(
        source, subfolder="transformer", dtype=env.default_dtype(env.device_info(device))
    ).to(device)
    report = write_gguf(transformer, path, gguf_type)
    del transformer
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return path, report
