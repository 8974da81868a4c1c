"""The mini FLUX's training script: it trains, stops, resumes where it stopped, and writes a loadable pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from quantlab import shapes
from quantlab.lab import train_mini


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_path):
    out = tmp_path_factory.mktemp("mini")
    first = train_mini.train(out, minutes=0.0, vae_steps=4, steps=4, batch=4, device="cpu")  # saves at once
    second = train_mini.train(out, minutes=5, vae_steps=4, steps=4, batch=4, device="cpu", log_every=1)
    return out, first, second


def test_a_run_out_of_time_saves_a_checkpoint_and_the_next_resumes(trained):
    out, first, second = trained
    assert (first["vae_step"], first["step"], first["done"]) == (0, 0, False)
    assert (second["vae_step"], second["step"], second["done"]) == (4, 4, True)
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert (state["vae_step"], state["step"]) == (4, 4)
    # stage 1 ended by fixing the latents' scale and shift in the VAE config, as FLUX's VAE has them
    assert state["vae_config"]["scaling_factor"] != 1.0 and state["vae_config"]["shift_factor"] != 0.0


def test_the_trained_model_is_a_small_flux_pipeline_folder(trained):
    out, _, second = trained
    model = out / "model"
    index = json.loads((model / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline" and index["transformer"] == ["diffusers", "FluxTransformer2DModel"]
    trained_bytes = sum(f.stat().st_size for part in ("transformer", "vae") for f in (model / part).rglob("*"))
    assert trained_bytes < 20 * 2**20  # what would be committed: the two trained components, in fp16
    config = json.loads((model / "transformer" / "config.json").read_text())
    assert (config["in_channels"], config["num_layers"], config["guidance_embeds"]) == (16, 1, False)


def test_evaluate_generates_64_pixel_images_and_scores_them(trained):
    out, _, _ = trained
    scenes = shapes.split_scenes()[1][:3]
    result = train_mini.evaluate(out / "model", scenes=scenes, steps=2, device="cpu")
    assert [np.asarray(i).shape for i in result["images"]] == [(64, 64, 3)] * 3
    assert result["captions"] == [shapes.caption(s) for s in scenes]
    assert 0.0 <= result["prompt_accuracy"] <= 1.0  # four training steps teach nothing; the GPU run does
