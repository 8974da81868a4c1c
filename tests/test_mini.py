"""The trained mini FLUX: shipped weights, the tiny model's text encoders, and its prompt accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import quantlab as ql
from quantlab import models, shapes

SHIPPED = models.TRAINED_DIR / "mini"


@pytest.fixture(scope="module")
def mini_path(private_cache) -> Path:
    return Path(ql.model_path("mini"))


def test_the_shipped_weights_are_the_transformer_and_vae_in_fp16_under_20_mb():
    files = [f for f in SHIPPED.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) < 20 * 2**20
    for part in ("transformer", "vae"):
        config = json.loads((SHIPPED / part / "config.json").read_text())
        assert config == {**config, **{k: v for k, v in models.get_model("mini").configs[part].items()
                                       if k not in {"scaling_factor", "shift_factor"}}}
    vae = json.loads((SHIPPED / "vae" / "config.json").read_text())
    assert vae["scaling_factor"] != 1.0  # training fixed the latents' scale, as FLUX's VAE config has it


def test_mini_is_a_flux_pipeline_folder_with_tiny_text_encoders(mini_path, tiny_path):
    index = json.loads((mini_path / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    for part in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        ours = sorted(f.relative_to(mini_path / part) for f in (mini_path / part).rglob("*") if f.is_file())
        theirs = sorted(f.relative_to(Path(tiny_path) / part) for f in (Path(tiny_path) / part).rglob("*") if f.is_file())
        assert ours == theirs, part
        for name in ours:  # the frozen encoders the transformer was trained with: byte for byte
            assert (mini_path / part / name).read_bytes() == (Path(tiny_path) / part / name).read_bytes(), name
    for part in ("transformer", "vae"):
        shipped = SHIPPED / part / "diffusion_pytorch_model.safetensors"
        assert (mini_path / part / shipped.name).read_bytes() == shipped.read_bytes()


def test_its_tokenizers_and_text_encoders_are_the_ones_it_was_trained_with(mini_path):
    from quantlab.lab import train_mini

    trained_with = json.loads((SHIPPED / "training.json").read_text())["text_fingerprint"]
    assert train_mini.text_fingerprint(mini_path) == trained_with


def test_the_card_reports_the_held_out_accuracy_of_at_least_90_percent():
    summary = json.loads((SHIPPED / "training.json").read_text())
    assert summary["prompt_accuracy"] >= 0.9 and summary["held_out_captions"] == 90
    assert f"{summary['prompt_accuracy']:.1%}" in (SHIPPED / "README.md").read_text()


def test_it_draws_held_out_captions_as_asked_on_a_cpu(mini_path):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(mini_path, dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    result = ql.quality.prompt_accuracy(pipe, models.get_model("mini").call_kwargs(), 90, batch_size=45)
    assert result.captions == shapes.held_out_captions()
    assert result.accuracy >= 0.85, result.accuracy  # bf16 on a CPU; the card's figure is fp32


def test_missing_trained_weights_say_how_to_get_them(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "TRAINED_DIR", tmp_path)
    with pytest.raises(models.ModelUnavailableError, match="train_mini"):
        ql.model_path("mini")
