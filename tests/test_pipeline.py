"""quantlab.pipeline: a recipe loaded and run end to end, one row with real values in every measured field."""

from __future__ import annotations

import copy

import pytest
import torch

import quantlab as ql
from quantlab import pipeline


def test_a_recipe_is_measured_and_compared_with_a_reference():
    base = pipeline.run_recipe("tiny", "bf16", steps=2, warmup=0, repeats=2, device="cpu")
    fp8 = pipeline.run_recipe("tiny", "fp8-layerwise-e4m3", steps=2, warmup=0, repeats=2, device="cpu",
                              reference_image=base.images)
    base, fp8, pipe = base.row, fp8.row, fp8.pipe
    assert (base.model, base.recipe, fp8.recipe) == ("tiny", "bf16", "fp8-layerwise-e4m3")
    assert (base.height, base.width, base.steps, base.repeats) == (128, 128, 2, 2)
    assert base.psnr_db is None and fp8.psnr_db is not None and 20 < fp8.psnr_db < 80
    assert base.mem_after_load_gib == pytest.approx(base.weights_bytes / 2**30)
    assert fp8.weights_bytes < base.weights_bytes  # the transformer's Linears went to one byte
    assert base.peak_gpu_mem_gib is None and base.peak_host_rss_gib > 0.1
    # host RAM is also measured while generating (offloading fills it then), and one CPU has no per-GPU figures
    assert base.extra["peak_host_rss_generating_gib"] > 0.1 and "peak_gpu_mem_per_device_gib" not in base.extra
    assert 0 < base.ms_per_step < base.s_per_image * 1000
    assert pipe is None  # freed unless asked to keep it


def test_a_failed_compile_is_recorded_and_the_eager_row_kept(monkeypatch):
    from diffusers import FluxTransformer2DModel

    def refuse(self, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(FluxTransformer2DModel, "compile", refuse)
    seen = []
    run = pipeline.run_recipe("tiny", "bf16+compile", steps=2, warmup=0, repeats=1, device="cpu",
                              on_eager_row=lambda row: seen.append(row.ms_per_step))
    row = run.row
    assert row.recipe == "bf16+compile" and row.extra["compile_error"] == "RuntimeError: no compiler here"
    assert seen == [row.extra["eager_ms_per_step"]] == [row.ms_per_step]  # the eager figures stay the row's


def test_a_compiled_row_carries_compiled_times_and_keeps_the_eager_ones(monkeypatch):
    from diffusers import FluxTransformer2DModel

    monkeypatch.setattr(FluxTransformer2DModel, "compile", lambda self, **kwargs: None)  # torch.compile's stand-in
    row = pipeline.run_recipe("tiny", "bf16+compile", steps=2, warmup=0, repeats=2, device="cpu").row
    assert row.recipe == "bf16+compile" and "compile_error" not in row.extra
    assert row.extra["compiled_region"] == "whole transformer" and row.extra["fullgraph"] is True
    assert row.extra["eager_ms_per_step"] > 0 and row.extra["eager_s_per_image"] > 0
    assert 0 < row.ms_per_step < row.s_per_image * 1000 and row.ms_per_step_iqr >= 0
    assert row.extra["compile_s"] == pytest.approx(row.extra["first_compiled_image_s"] - row.s_per_image)
    # nothing was compiled, so the "compiled" output is the eager one, to the bit
    assert row.extra["compiled_vs_eager_sqnr_db"] == float("inf") and row.extra["compile_disagrees"] is False


def test_a_compiled_output_that_disagrees_with_eager_is_flagged(monkeypatch):
    from diffusers import FluxTransformer2DModel

    def miscompile(self, **kwargs):  # a "compiled" transformer that adds noise a tenth of the output's size
        forward = self.forward

        def noisy(*args, **kw):
            out = forward(*args, **kw)
            sample = out[0]
            return (sample + 0.1 * sample.std() * torch.randn_like(sample), *out[1:])

        self.forward = noisy

    monkeypatch.setattr(FluxTransformer2DModel, "compile", miscompile)
    row = pipeline.run_recipe("tiny", "bf16+compile", steps=2, warmup=0, repeats=1, device="cpu").row
    assert row.extra["compile_disagrees"] is True
    assert row.extra["compiled_vs_eager_sqnr_db"] == pytest.approx(20, abs=3)  # 10 % noise: 20 dB
    assert "COMPILED OUTPUT DISAGREES WITH EAGER" in row.notes


def test_regional_compile_compiles_each_repeated_block(monkeypatch):
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    compiled_blocks = []
    for block_class in (FluxTransformerBlock, FluxSingleTransformerBlock):
        monkeypatch.setattr(block_class, "compile", lambda self, **kwargs: compiled_blocks.append(self), raising=False)
    run = pipeline.run_recipe("tiny", "bf16+compile-regional", steps=2, warmup=0, repeats=1, device="cpu",
                              keep_pipeline=True)
    transformer = run.pipe.transformer
    assert len(compiled_blocks) == len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)
    assert run.row.extra["compiled_region"] == "repeated blocks"


def test_nan_weights_raise_before_a_figure_is_made(monkeypatch, tiny_path):
    real_load = pipeline.load_pipeline

    def poisoned(*args, **kwargs):
        pipe = real_load(*args, **kwargs)
        with torch.no_grad():
            pipe.transformer.transformer_blocks[0].attn.to_q.weight[0, 0] = float("nan")
        return pipe

    monkeypatch.setattr(pipeline, "load_pipeline", poisoned)
    with pytest.raises(ql.quality.NonFiniteError, match="transformer .*produced NaN") as error:
        pipeline.run_recipe("tiny", "bf16", steps=2, warmup=0, repeats=1, device="cpu")
    assert "bf16 where the GPU has it" in str(error.value)


def test_a_pipeline_placed_by_a_plain_device_map_records_it(tiny_path, monkeypatch):
    # torchao recipes load with device_map="cuda", which leaves pipe.hf_device_map a string, not a dict
    real_load = pipeline.load_pipeline

    def load_with_string_map(*args, **kwargs):
        pipe = real_load(*args, **kwargs)
        pipe.hf_device_map = "cpu"
        return pipe

    monkeypatch.setattr(pipeline, "load_pipeline", load_with_string_map)
    run = pipeline.run_recipe("tiny", "bf16", device="cpu", warmup=0, repeats=1, steps=2)
    assert run.row.extra["hf_device_map"] == "cpu"
    assert run.row.s_per_image > 0


def test_a_whole_script_is_not_a_pipeline_to_load_here(monkeypatch):
    monkeypatch.setattr(ql.models, "model_path", lambda *a, **k: pytest.fail("must not reach the model"))
    with pytest.raises(ValueError, match="whole script for a small GPU.*code\\(\\)"):
        pipeline.load_pipeline("tiny", "nf4-encode-then-free", device="cpu")


def test_speedups_that_the_lab_applies_are_refused_without_its_steps(tiny_pipe):
    transformer = copy.deepcopy(tiny_pipe.transformer)
    recipe = ql.get_recipe("float8static-tensor+fused-qkv+attn-fa3-fp8+gelu-sigmoid+compile-regional+cuda-graph")
    h100 = ql.env.describe_gpu("NVIDIA H100 80GB HBM3", (9, 0))
    with pytest.raises(ValueError, match="hand-written steps .*quantlab.lab.speed"):
        ql.speed.apply_speedups(transformer, recipe.speedups, device=h100)
