"""The model registry, sizes from configs, the embedded tiny FLUX build, and access checks."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import quantlab as ql
from quantlab import models

# Parameter counts of the published FLUX.1-dev components (transformer, T5-XXL encoder, CLIP-L, VAE).
FLUX_DEV_COUNTS = {
    "transformer": 11_901_408_320,
    "text_encoder_2": 4_762_310_656,
    "text_encoder": 123_060_480,
    "vae": 83_819_683,
}


def test_registry_lists_the_five_models():
    assert ql.list_models() == [
        "tiny", "mini", "flux-dev-shaped", "black-forest-labs/FLUX.1-dev", "black-forest-labs/FLUX.1-schnell"
    ]
    assert ql.get_model().name == "mini"


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError) as error:
        ql.get_model("flux-3")
    for name in ql.list_models():
        assert name in str(error.value)


def test_model_chosen_by_environment(monkeypatch):
    monkeypatch.setenv("QUANTLAB_MODEL", "black-forest-labs/FLUX.1-schnell")
    assert ql.get_model().name == "black-forest-labs/FLUX.1-schnell"
    monkeypatch.setenv("QUANTLAB_MODEL", "nope")
    with pytest.raises(ValueError, match="Valid models"):
        ql.get_model()


def test_flux_dev_sizes_from_configs_match_published_figures():
    counts = models.component_param_counts("black-forest-labs/FLUX.1-dev")
    assert counts == FLUX_DEV_COUNTS
    gib = {name: count * 2 / 2**30 for name, count in counts.items()}  # bf16: 2 bytes per weight
    assert gib["transformer"] * 2**30 / 1e9 == pytest.approx(23.80, abs=0.01)  # the blog's 23.8 GB
    assert gib["text_encoder_2"] * 2**30 / 1e9 == pytest.approx(9.52, abs=0.01)  # and 9.52 GB
    assert sum(gib.values()) == pytest.approx(31.424, abs=0.001)  # the blog's "31.447 GB" is GiB, plus buffers


def test_flux_dev_shaped_has_flux_dev_architecture_and_schnell_has_no_guidance():
    assert models.component_param_counts("flux-dev-shaped") == FLUX_DEV_COUNTS
    schnell = models.component_param_counts("black-forest-labs/FLUX.1-schnell")
    assert schnell["text_encoder_2"] == FLUX_DEV_COUNTS["text_encoder_2"]
    assert schnell["transformer"] < FLUX_DEV_COUNTS["transformer"]  # no guidance embedder
    assert ql.get_model("black-forest-labs/FLUX.1-schnell").call_kwargs()["guidance_scale"] == 0.0


def test_tiny_pipeline_has_the_seven_real_components(tiny_pipe):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    expected = {
        "transformer": FluxTransformer2DModel, "text_encoder": CLIPTextModel, "tokenizer": CLIPTokenizer,
        "text_encoder_2": T5EncoderModel, "tokenizer_2": T5TokenizerFast, "vae": AutoencoderKL,
        "scheduler": FlowMatchEulerDiscreteScheduler,
    }
    for name, cls in expected.items():
        assert isinstance(tiny_pipe.components[name], cls), name
    assert tiny_pipe.transformer.dtype == torch.bfloat16


def test_tiny_transformer_is_shaped_like_flux_dev(tiny_pipe):
    transformer = tiny_pipe.transformer
    assert transformer.config.guidance_embeds is True
    assert transformer.config.in_channels == 64
    linears = models.linear_layers(transformer)
    assert linears["x_embedder"].in_features == 64  # the real width: 16 latent channels x 2 x 2
    assert linears["proj_out"].out_features == 64
    odd = {n: (m.in_features, m.out_features) for n, m in linears.items()
           if (m.in_features % 256 or m.out_features % 256) and n not in ("x_embedder", "proj_out")}
    assert odd == {}
    assert len(transformer.transformer_blocks) == 2 and len(transformer.single_transformer_blocks) == 4
    # the same Linear layer names as FLUX.1-dev, so skip lists written for one apply to the other
    dev = models.meta_component("black-forest-labs/FLUX.1-dev", "transformer")
    assert next(dev.parameters()).device.type == "meta"
    dev_names = {n.split(".", 2)[-1] if n[0].isalpha() and ".0." in n else n for n in models.linear_layers(dev)}
    tiny_names = {n.split(".", 2)[-1] if n[0].isalpha() and ".0." in n else n for n in linears}
    assert tiny_names <= dev_names


def test_tiny_weights_are_bell_shaped_with_std_one_over_sqrt_fan_in(tiny_pipe):
    weight = tiny_pipe.transformer.transformer_blocks[0].ff.net[0].proj.weight.float()
    assert weight.std().item() == pytest.approx(weight.shape[1] ** -0.5, rel=0.05)
    assert weight.mean().abs().item() < 0.01 * weight.std().item() * 10


def test_tiny_tokenizers_are_built_locally(tiny_pipe):
    clip = tiny_pipe.tokenizer("a small red circle", padding="max_length", max_length=77, truncation=True)
    assert len(clip.input_ids) == 77
    assert clip.input_ids[0] == 0 and clip.input_ids[-1] == 1  # start and end-of-text tokens
    t5 = tiny_pipe.tokenizer_2("a small red circle").input_ids
    assert max(t5) < tiny_pipe.text_encoder_2.config.vocab_size
    assert tiny_pipe.tokenizer_2.decode(t5, skip_special_tokens=True) == "a small red circle"


def _transformer_digest(folder: Path) -> str:
    state = load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].float().numpy().tobytes())
    return digest.hexdigest()


def test_build_is_deterministic_per_seed(tmp_path, tiny_path):
    again = models.build_embedded_model("tiny", tmp_path / "again", seed=0, device="cpu")
    other = models.build_embedded_model("tiny", tmp_path / "other", seed=1, device="cpu")
    assert _transformer_digest(again) == _transformer_digest(Path(tiny_path))
    assert _transformer_digest(other) != _transformer_digest(Path(tiny_path))


def test_model_path_builds_once_then_reuses_the_cache(tiny_path):
    index = Path(tiny_path) / "model_index.json"
    before = index.stat().st_mtime_ns
    assert ql.model_path("tiny") == tiny_path
    assert index.stat().st_mtime_ns == before


def test_interrupted_build_leaves_nothing_behind(tmp_path, monkeypatch):
    real = models._build_component

    def fail_on_vae(component, *args, **kwargs):
        if component == "vae":
            raise KeyboardInterrupt("simulated Ctrl-C during the build")
        return real(component, *args, **kwargs)

    monkeypatch.setattr(models, "_build_component", fail_on_vae)
    with pytest.raises(KeyboardInterrupt):
        models.build_embedded_model("tiny", tmp_path / "tiny", device="cpu")
    assert list(tmp_path.iterdir()) == []


def test_flux_dev_shaped_on_cpu_is_refused_before_building(tmp_path):
    with pytest.raises(models.ModelUnavailableError, match="CUDA GPU"):
        models.build_embedded_model("flux-dev-shaped", tmp_path / "big", device="cpu")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="Embedded models: tiny, mini, flux-dev-shaped"):
        models.build_embedded_model("black-forest-labs/FLUX.1-dev", tmp_path / "x")


def test_hub_model_offline_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty Hugging Face cache
    with pytest.raises(models.ModelUnavailableError) as error:
        ql.model_path("black-forest-labs/FLUX.1-schnell")
    message = str(error.value)
    assert "HF_HUB_OFFLINE" in message and "QUANTLAB_MODEL=tiny" in message


def test_hub_model_without_network_says_what_to_do(monkeypatch, tmp_path):
    # This machine reaches no Hub: the real download check fails, and the message must say what to do.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    try:
        ql.model_path("black-forest-labs/FLUX.1-schnell")
    except models.ModelUnavailableError as error:
        assert "Cannot reach the Hugging Face Hub" in str(error) and "QUANTLAB_MODEL=tiny" in str(error)
    else:
        pytest.skip("the Hugging Face Hub is reachable from this machine")


def test_a_bug_is_not_reported_as_no_network(monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))

    def broken(repo_id, **kwargs):
        raise AttributeError("a programming error, not a network one")

    monkeypatch.setattr(huggingface_hub, "auth_check", broken)
    with pytest.raises(AttributeError):
        ql.model_path("black-forest-labs/FLUX.1-schnell")


def test_gated_model_without_token_says_how_to_log_in(monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    httpx2 = pytest.importorskip("httpx2")  # the HTTP client of huggingface_hub 2.x

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))

    def gated(repo_id, **kwargs):
        request = httpx2.Request("GET", f"https://huggingface.co/api/models/{repo_id}")
        raise GatedRepoError(f"Access to model {repo_id} is restricted.",
                             response=httpx2.Response(401, request=request))

    monkeypatch.setattr(huggingface_hub, "auth_check", gated)
    with pytest.raises(models.ModelUnavailableError) as error:
        ql.model_path("black-forest-labs/FLUX.1-dev")
    message = str(error.value)
    assert "hf auth login" in message and "HF_TOKEN" in message and "FLUX.1-schnell" in message


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path))
    assert models.cache_dir() == tmp_path
    monkeypatch.delenv("QUANTLAB_CACHE")
    assert models.cache_dir() == Path(os.path.expanduser("~")) / ".cache" / "quantlab"


# --- a cache that heals ---------------------------------------------------------------------------


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """A cache of its own, so that damaging it leaves the session's tiny model alone."""
    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path))
    return tmp_path


def test_a_build_records_every_file_and_model_path_checks_them(own_cache):
    path = Path(ql.model_path("tiny"))
    manifest = json.loads((path / models.MANIFEST).read_text())
    weights = "transformer/diffusion_pytorch_model.safetensors"
    assert manifest["build_version"] == models.EMBEDDED_BUILD_VERSION and weights in manifest["files"]
    assert manifest["files"][weights]["bytes"] == (path / weights).stat().st_size
    assert len(manifest["files"][weights]["sha256"]) == 64
    assert models.verify_cache(path) is None


def test_a_truncated_cache_file_is_found_and_rebuilt(own_cache, capsys):
    path = Path(ql.model_path("tiny"))
    weights = path / "transformer" / "diffusion_pytorch_model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])  # a full disk, or a copy killed half way
    assert "transformer/diffusion_pytorch_model.safetensors is" in models.verify_cache(path)
    assert ql.model_path("tiny") == str(path)
    assert weights.read_bytes() == good and models.verify_cache(path) is None
    assert "is damaged (transformer/diffusion_pytorch_model.safetensors is" in capsys.readouterr().err
    from diffusers import FluxPipeline

    FluxPipeline.from_pretrained(path)  # loads again


def test_a_corrupt_file_of_the_same_size_and_a_missing_one_are_found(own_cache):
    path = Path(ql.model_path("tiny"))
    config = path / "vae" / "config.json"
    text = config.read_text()
    config.write_text(text.replace("silu", "gelu"))  # the same length, other bytes
    assert models.verify_cache(path) == "vae/config.json does not hash to what its build wrote (corrupt)"
    assert models.verify_cache(path, hashes=False) is None  # a large cache checks sizes only
    config.unlink()
    assert models.verify_cache(path) == "vae/config.json is missing"
    (path / models.MANIFEST).unlink()
    assert "manifest quantlab.json is missing" in models.verify_cache(path)
    ql.model_path("tiny")  # rebuilt
    assert models.verify_cache(path) is None


def test_a_damaged_cache_of_a_gpu_model_on_a_cpu_says_how_to_rebuild(own_cache, monkeypatch):
    path = models._embedded_path("flux-dev-shaped", 0)
    path.mkdir(parents=True)
    (path / models.MANIFEST).write_text(json.dumps({"files": {"model_index.json": {"bytes": 10, "sha256": None}}}))
    with pytest.raises(models.ModelUnavailableError, match="is damaged: model_index.json is missing.*delete .* GPU"):
        ql.model_path("flux-dev-shaped")


def test_a_build_killed_mid_write_leaves_a_partial_that_the_next_use_removes(own_cache):
    import os
    import signal
    import subprocess
    import sys
    import time

    killed = subprocess.Popen([sys.executable, "-c", "import quantlab as ql, time; "
                               "ql.models._write_model_index = lambda folder: time.sleep(60); ql.model_path('tiny')"],
                              env={**os.environ, "QUANTLAB_CACHE": str(own_cache)})
    deadline = time.time() + 120
    while not list(own_cache.glob(".*.partial-*")) and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # well inside the build
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    (partial,) = own_cache.glob(".*.partial-*")
    assert partial.name.endswith(f".partial-{killed.pid}") and partial.is_dir()
    path = ql.model_path("tiny")
    assert not partial.exists() and models.verify_cache(path) is None
    assert sorted(p.name for p in own_cache.iterdir()) == [Path(path).name]
