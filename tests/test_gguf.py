"""Tests for quantlab.gguf: writing FLUX transformers to GGUF, checking files, loading them with diffusers."""

from __future__ import annotations

import gguf
import pytest
import torch
from diffusers import FluxTransformer2DModel

import quantlab as ql
from quantlab import gguf as qg


@pytest.fixture(scope="module")
def transformer(tiny_path):
    return FluxTransformer2DModel.from_pretrained(tiny_path, subfolder="transformer", torch_dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def q8_file(transformer, tmp_path_factory):
    return qg.write_gguf(transformer, tmp_path_factory.mktemp("gguf") / "tiny-Q8_0.gguf", "Q8_0")


@pytest.fixture(scope="module")
def transformer_inputs(tiny_pipe):
    spec = ql.get_model("tiny")
    return ql.quality.capture_transformer_inputs(tiny_pipe, "a red circle", spec.call_kwargs())


def test_the_plan_keeps_1d_tensors_in_f32_and_edge_layers_in_f16():
    shapes = {
        "x_embedder.weight": (3072, 64),
        "x_embedder.bias": (3072,),
        "proj_out.weight": (64, 3072),
        "single_transformer_blocks.0.proj_out.weight": (3072, 15360),
        "transformer_blocks.0.attn.norm_q.weight": (128,),
        "transformer_blocks.0.attn.to_q.weight": (3072, 3072),
        "odd.weight": (256, 300),
    }
    plan = {p.name: p.gguf_type for p in qg.plan_tensors(shapes, "Q4_K")}
    assert plan == {
        "x_embedder.weight": "F16",
        "x_embedder.bias": "F32",
        "proj_out.weight": "F16",
        "single_transformer_blocks.0.proj_out.weight": "Q4_K",  # a block's proj_out is not the edge layer
        "transformer_blocks.0.attn.norm_q.weight": "F32",
        "transformer_blocks.0.attn.to_q.weight": "Q4_K",
        "odd.weight": "F16",  # 300 columns do not fill 256-weight super-blocks
    }
    assert {p.gguf_type for p in qg.plan_tensors({"x_embedder.weight": (8, 64)}, "BF16")} == {"BF16"}


def test_flux_dev_keeps_under_one_percent_in_float():
    meta = ql.models.meta_component("black-forest-labs/FLUX.1-dev", "transformer")
    plans = qg.plan_tensors({n: tuple(t.shape) for n, t in meta.state_dict().items()}, "Q2_K")
    total = sum(p.n_params for p in plans)
    quantized = sum(p.n_params for p in plans if p.gguf_type == "Q2_K")
    assert total == 11_901_408_320
    assert 0.99 < quantized / total < 1.0


@pytest.mark.parametrize("gguf_type", ["Q8_0", "Q4_1", "Q4_K", "Q2_K", "F16"])
def test_a_written_file_has_the_planned_size_and_reads_back_as_written(transformer, tmp_path, gguf_type):
    report = qg.write_gguf(transformer, tmp_path / f"{gguf_type}.gguf", gguf_type)
    planned = sum(p.n_bytes for p in report.tensors)
    assert planned <= report.file_bytes < planned + 64 * 1024 + 32 * len(report.tensors)
    assert report.n_params == sum(t.numel() for t in transformer.state_dict().values())
    info = qg.inspect_gguf(report.path)
    assert info.architecture == "flux" and info.n_tensors == len(transformer.state_dict())
    assert info.tensors_per_type[gguf_type] == sum(p.gguf_type == gguf_type for p in report.tensors) > 0
    assert info.config["num_layers"] == transformer.config.num_layers
    # the bytes of one quantized tensor decode, through gguf, to the original within the type's error
    reader = gguf.GGUFReader(str(report.path))
    stored = next(t for t in reader.tensors if t.name == "transformer_blocks.0.attn.to_q.weight")
    decoded = torch.from_numpy(ql.gguf_quants.dequantize(stored.data, gguf_type)).reshape(-1, stored.shape[0])
    original = transformer.transformer_blocks[0].attn.to_q.weight.float()
    bound = {"Q8_0": 0.01, "Q4_1": 0.1, "Q4_K": 0.09, "Q2_K": 0.35, "F16": 0.001}[gguf_type]
    assert ql.quality.relative_error(decoded, original) < bound


def test_loading_gives_packed_weights_and_outputs_close_to_bf16(q8_file, tiny_path, tiny_pipe, transformer_inputs):
    loaded = qg.load_transformer(q8_file.path, tiny_path, compute_dtype=torch.bfloat16)
    weight = loaded.transformer_blocks[0].attn.to_q.weight
    assert type(weight).__name__ == "GGUFParameter" and weight.dtype == torch.uint8
    assert weight.quant_type == gguf.GGMLQuantizationType.Q8_0
    with torch.no_grad():
        reference = tiny_pipe.transformer(**transformer_inputs)[0]
        output = loaded(**transformer_inputs)[0]
    assert ql.quality.sqnr_db(output, reference) > 30


def test_load_pipeline_takes_the_file_and_refuses_a_file_of_another_type(q8_file):
    pipe = ql.load_pipeline("tiny", "gguf-q8_0", device="cpu", gguf_file=q8_file.path)
    assert type(pipe.transformer.transformer_blocks[0].attn.to_q.weight).__name__ == "GGUFParameter"
    with pytest.raises(ValueError, match=r"wants a Q2_K file.*tiny-Q8_0\.gguf"):
        ql.load_pipeline("tiny", "gguf-q2_k", device="cpu", gguf_file=q8_file.path)
    with pytest.raises(ValueError, match=r"wants a F16 file"):  # its float edge layers do not make it an F16 file
        ql.load_pipeline("tiny", "gguf-f16", device="cpu", gguf_file=q8_file.path)


def test_a_truncated_file_names_the_file_and_the_problem(q8_file, tmp_path, tiny_path):
    for keep_bytes in (q8_file.file_bytes // 2, q8_file.file_bytes - 1, 100):
        truncated = tmp_path / f"cut-{keep_bytes}.gguf"
        truncated.write_bytes(q8_file.path.read_bytes()[:keep_bytes])
        with pytest.raises(qg.GGUFFileError, match="truncated") as error:
            qg.load_transformer(truncated, tiny_path)
        assert str(truncated) in str(error.value)


def test_a_corrupt_or_foreign_file_is_refused_before_loading(q8_file, tmp_path, tiny_path):
    html = tmp_path / "page.gguf"
    html.write_bytes(b"<!DOCTYPE html><title>404</title>" + bytes(100))
    with pytest.raises(qg.GGUFFileError, match=r"not a GGUF file.*error page"):
        qg.load_transformer(html, tiny_path)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(qg.GGUFFileError, match=r"empty\.gguf is empty or truncated \(0 bytes\)"):
        qg.inspect_gguf(empty)
    damaged = tmp_path / "damaged.gguf"
    data = bytearray(q8_file.path.read_bytes())
    data[8:16] = (2**62).to_bytes(8, "little")  # the tensor count
    damaged.write_bytes(bytes(data))
    with pytest.raises(qg.GGUFFileError, match=r"damaged\.gguf is truncated or corrupt"):
        qg.inspect_gguf(damaged)


def test_a_file_for_another_architecture_or_a_missing_config_is_named(transformer, tmp_path, tiny_path):
    config = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
    other = FluxTransformer2DModel.from_config({**config, "num_single_layers": config["num_single_layers"] + 1})
    other_file = qg.write_gguf(other, tmp_path / "other.gguf", "Q8_0").path
    with pytest.raises(qg.GGUFFileError, match=r"other\.gguf is for a different model.*tensors unexpected"):
        qg.load_transformer(other_file, tiny_path)
    wider = FluxTransformer2DModel.from_config({**config, "joint_attention_dim": config["joint_attention_dim"] * 2})
    wider_file = qg.write_gguf(wider, tmp_path / "wider.gguf", "Q8_0").path
    with pytest.raises(qg.GGUFFileError, match=r"other shapes \(e\.g\. context_embedder\.weight"):
        qg.check_gguf_file(wider_file, tiny_path)
    with pytest.raises(FileNotFoundError, match=r"No transformer config at .*nowhere"):
        qg.load_transformer(other_file, tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"never\.gguf does not exist"):
        qg.load_transformer(tmp_path / "never.gguf", tiny_path)


def test_a_failed_write_leaves_the_earlier_file_untouched(transformer, q8_file, tmp_path):
    target = tmp_path / "model.gguf"
    target.write_bytes(q8_file.path.read_bytes())
    before = target.read_bytes()
    broken = FluxTransformer2DModel.from_config(
        {k: v for k, v in transformer.config.items() if not k.startswith("_")})
    with torch.no_grad():
        broken.transformer_blocks[0].attn.to_k.weight[3, 7] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        qg.write_gguf(broken, target, "Q4_K")
    assert target.read_bytes() == before
    assert not list(tmp_path.glob(".*.partial-*"))


KILLED_WRITER = """
import sys, time
import torch
from diffusers import FluxTransformer2DModel
from quantlab import gguf as qg

transformer = FluxTransformer2DModel.from_pretrained(sys.argv[1], subfolder="transformer", dtype=torch.bfloat16)
real = qg._encode
def slow(*args):  # one tensor written, then a pause long enough to be killed in
    time.sleep(0.5)
    return real(*args)
qg._encode = slow
qg.write_gguf(transformer, sys.argv[2], "Q8_0")
"""


def test_a_writer_killed_mid_write_keeps_the_old_file_and_the_next_write_clears_its_debris(transformer, q8_file,
                                                                                          tmp_path, tiny_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    target = tmp_path / "model.gguf"
    target.write_bytes(q8_file.path.read_bytes())
    before = target.read_bytes()
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, tiny_path, str(target)])
    partial = ql.files.partial_path(target, writer.pid)
    deadline = time.time() + 120
    while not (partial.exists() and partial.stat().st_size > 0) and time.time() < deadline:
        time.sleep(0.05)
    os.kill(writer.pid, signal.SIGKILL)  # as a full disk, an OOM killer or a closed Colab tab would
    writer.wait()
    assert partial.exists(), "the writer was killed before it began: nothing to clear"
    assert target.read_bytes() == before  # the old file is intact, the partial beside it
    report = qg.write_gguf(transformer, target, "Q8_0")  # the next write of the same file
    assert not partial.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]
    assert report.file_bytes == len(before)
