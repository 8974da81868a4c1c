"""Tests for quantlab.quanto: weight types, tensor classes, kernel loading and diffusers' deprecation."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel, QuantoConfig
from packaging.version import Version

import diffusers
import quantlab as ql


@pytest.fixture(scope="module")
def int8_transformer(tiny_path):
    transformer, messages = ql.quanto.deprecation_messages(lambda: FluxTransformer2DModel.from_pretrained(
        tiny_path, subfolder="transformer", quantization_config=QuantoConfig(weights_dtype="int8"),
        torch_dtype=torch.bfloat16))
    return transformer, messages


def test_qtype_maps_every_weight_type_and_refuses_others():
    assert [ql.quanto.qtype(w).name for w in ql.quanto.WEIGHT_TYPES] == ["qint8", "qfloat8_e4m3fn", "qint4", "qint2"]
    with pytest.raises(ValueError, match="Unknown quanto weight type 'int3'. Valid: int8, float8, int4, int2"):
        ql.quanto.qtype("int3")


def test_weight_tensor_types_counts_every_linear(int8_transformer, tiny_path):
    transformer, _ = int8_transformer
    linears = sum(isinstance(m, torch.nn.Linear) for m in transformer.modules())
    assert ql.quanto.weight_tensor_types(transformer) == {"WeightQBytesTensor qint8": linears}
    bf16 = FluxTransformer2DModel.from_pretrained(tiny_path, subfolder="transformer", torch_dtype=torch.bfloat16)
    assert ql.quanto.weight_tensor_types(bf16) == {"Tensor torch.bfloat16": linears}


def test_diffusers_deprecation_is_caught_and_dated(int8_transformer):
    _, messages = int8_transformer
    installed = Version(diffusers.__version__)
    assert installed >= Version(ql.quanto.DIFFUSERS_DEPRECATION["deprecated_in"])
    assert any("QuantoConfig" in m and "1.0.0" in m for m in messages)
    assert len(messages) == len(set(messages))
    result, none = ql.quanto.deprecation_messages(lambda: 42)
    assert result == 42 and none == []


def test_load_kernels_reports_a_build_already_loaded(monkeypatch):
    first = ql.quanto.load_kernels("quanto_cpp")
    assert first.extension == "quanto_cpp" and first.seconds >= 0 and first.build_directory.endswith("build")
    second = ql.quanto.load_kernels("quanto_cpp", rebuild=True)  # loaded already: nothing is deleted or rebuilt
    assert second.already_loaded and second.seconds == 0.0 and not second.built


def test_unknown_kernel_extension_names_the_ones_there_are():
    assert "quanto_cpp" in ql.quanto.kernel_extensions()
    with pytest.raises(ValueError, match="quanto has no 'quanto_nope' kernels") as error:
        ql.quanto.load_kernels("quanto_nope")
    assert "quanto_cpp" in str(error.value)
