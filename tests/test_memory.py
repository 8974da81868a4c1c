"""Tests for quantlab.memory: the layerwise casting plan against what diffusers casts, placement, and choosing rows."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.hooks import apply_layerwise_casting

import quantlab as ql


def _fp8_params(module):
    return sum(p.numel() for p in module.parameters() if p.dtype == torch.float8_e4m3fn)


@pytest.fixture()
def tiny_transformer(tiny_path):
    return FluxTransformer2DModel.from_pretrained(tiny_path, subfolder="transformer", torch_dtype=torch.bfloat16)


def test_plan_matches_what_enable_layerwise_casting_casts(tiny_transformer):
    plan = pd.DataFrame(ql.memory.layerwise_casting_plan(tiny_transformer))
    assert plan.params.sum() == sum(p.numel() for p in tiny_transformer.parameters())
    tiny_transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    assert _fp8_params(tiny_transformer) == plan[plan.cast].params.sum() > 0


def test_plan_with_patterns_matches_apply_layerwise_casting(tiny_transformer):
    patterns = ("pos_embed", "^proj_out$")
    plan = pd.DataFrame(ql.memory.layerwise_casting_plan(tiny_transformer, patterns))
    apply_layerwise_casting(tiny_transformer, torch.float8_e4m3fn, torch.bfloat16, skip_modules_pattern=patterns)
    assert _fp8_params(tiny_transformer) == plan[plan.cast].params.sum()
    assert set(plan.skipped_by.dropna()) <= set(patterns) | {"(not a Linear, Conv or Embedding)"}


def test_enable_layerwise_casting_always_adds_the_models_own_patterns(tiny_transformer):
    assert ql.memory.layerwise_skip_patterns(tiny_transformer) == ("^proj_in$", "^proj_out$", "norm", "patch_embed",
                                                                   "pos_embed")
    assert "norm" in ql.memory.layerwise_skip_patterns(tiny_transformer, ("^proj_out$",))


def test_flux_dev_norm_pattern_keeps_the_modulation_linears():
    plan = pd.DataFrame(ql.memory.layerwise_casting_plan(ql.models.meta_component("black-forest-labs/FLUX.1-dev",
                                                                                  "transformer")))
    assert plan.params.sum() == 11_901_408_320
    assert plan[plan.cast].params.sum() == 8_653_744_128
    by_norm = plan[plan.skipped_by == "norm"]
    assert by_norm.params.sum() == 3_247_467_520
    assert set(by_norm[by_norm.params > 10**6]["class"]) == {"AdaLayerNormZero", "AdaLayerNormZeroSingle",
                                                             "AdaLayerNormContinuous"}


def test_component_placement_names_devices_and_hooks(tiny_pipe):
    before = ql.memory.component_placement(tiny_pipe)
    assert set(before) == {"transformer", "text_encoder", "text_encoder_2", "vae"}
    assert before["transformer"] == {"weights_on": "cpu", "device_map": None, "hooks": None}
    cast = ql.load_pipeline("tiny", "fp8-layerwise-e4m3", device="cpu")
    placement = ql.memory.component_placement(cast)
    assert placement["transformer"]["hooks"] == "layerwise_casting" and placement["vae"]["hooks"] is None


ROWS = pd.DataFrame([
    {"recipe": "big", "peak_gpu_mem_gib": 30.0, "s_per_image": 9.0},
    {"recipe": "offloaded", "peak_gpu_mem_gib": 7.5, "s_per_image": 16.0},
    {"recipe": "sequential", "peak_gpu_mem_gib": 2.5, "s_per_image": 220.0},
    {"recipe": "cpu", "peak_gpu_mem_gib": None, "s_per_image": 1.0},
])


def test_lowest_peak_and_fastest_within_a_budget():
    assert ql.memory.lowest_peak(ROWS).recipe == "sequential"
    assert ql.memory.fastest_within(ROWS, peak_gib=8).recipe == "offloaded"
    assert ql.memory.fastest_within(ROWS, peak_gib=40).recipe == "big"
    assert ql.memory.fastest_within(ROWS, peak_gib=1) is None


def test_fastest_within_subtracts_nothing_from_the_budget():
    # chapter 05 says so: a peak equal to the budget fits; a margin for the driver is the caller's to take
    assert ql.memory.fastest_within(ROWS, peak_gib=7.5).recipe == "offloaded"
    assert ql.memory.fastest_within(ROWS, peak_gib=7.5 - 0.25).recipe == "sequential"


def test_choosing_needs_gpu_rows_and_the_columns():
    with pytest.raises(ValueError, match="nothing was measured on a GPU"):
        ql.memory.lowest_peak(ROWS[ROWS.recipe == "cpu"])
    with pytest.raises(ValueError, match="No column 's_per_image'"):
        ql.memory.lowest_peak(ROWS.drop(columns="s_per_image"))
