"""Train the mini FLUX on coloured shapes, in steps of a few minutes that resume where they stopped.

    python -m quantlab.lab.train_mini --out DIR [--minutes 9] [--seed 0]

Stage 1 trains an `AutoencoderKL` to reconstruct 64×64 shape images (`ql.shapes`). Stage 2 trains a
`FluxTransformer2DModel` with rectified flow (the objective FLUX uses) on the autoencoder's latents,
conditioned on the captions through the tiny model's CLIP and T5 encoders, which stay frozen (so the
mini model rebuilds them from the same seed, offline, and only the transformer and the autoencoder
need committing). Each call trains until `--minutes` have passed, saves `DIR/checkpoint.pt` (weights,
optimizer, step, random state) and exits; the next call resumes from it. When both stages are done,
it writes `DIR/model`, a folder `FluxPipeline.from_pretrained` loads, and measures its prompt accuracy
on held-out captions (`DIR/model/quantlab.json`).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .. import models, shapes
from ..files import atomic_output

__all__ = ["MINI_TRANSFORMER", "MINI_VAE", "MINI_SCHEDULER", "TEXT_TOKENS", "train", "evaluate", "ship", "model_card", "text_fingerprint",
           "main"]

# The architecture is the registry's "mini" model (quantlab.models).
MINI_TRANSFORMER, MINI_VAE, MINI_SCHEDULER = models.MINI_TRANSFORMER, models.MINI_VAE, models.MINI_SCHEDULER
TEXT_TOKENS = 48  # the longest caption is 37 T5 tokens (14 for CLIP)
IMAGE_SIZE = 64


def _images(scenes, device) -> torch.Tensor:
    pixels = np.stack([shapes.render(s, IMAGE_SIZE) for s in scenes]).astype(np.float32) / 127.5 - 1
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).to(device)


def _pack(latents: torch.Tensor) -> torch.Tensor:
    from diffusers import FluxPipeline

    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


class _Trainer:
    """Everything a resumed run needs: the models, their optimizers, the step counters and the data."""

    def __init__(self, out: Path, seed: int, device: str, vae_steps: int, steps: int, batch: int):
        from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel

        self.out, self.device, self.vae_steps, self.steps, self.batch = out, device, vae_steps, steps, batch
        torch.manual_seed(seed)
        self.rng = np.random.default_rng(seed)
        self.train_scenes, self.held_out = shapes.split_scenes(0.1, seed=seed)
        self.vae = AutoencoderKL.from_config(MINI_VAE).to(device)
        self.transformer = FluxTransformer2DModel.from_config(MINI_TRANSFORMER).to(device)
        self.vae_optimizer = torch.optim.AdamW(self.vae.parameters(), lr=1e-3, weight_decay=0.0)
        self.optimizer = torch.optim.AdamW(self.transformer.parameters(), lr=3e-4, weight_decay=0.01)
        self.vae_step = self.step = 0
        self.tiny = models.model_path("tiny", seed=0)  # its tokenizers and frozen text encoders
        self.text_encoders = Path(self.tiny).name  # which build: a transformer trained on others must restart
        self.text_pipe = FluxPipeline.from_pretrained(self.tiny, transformer=None, vae=None, dtype=torch.float32)
        self.text_pipe.to(device)
        self.latents = self.embeds = None
        self.pixels = _images(self.train_scenes, device)  # the data is fixed: render it once

    # -- checkpoints --------------------------------------------------------------------------
    def save(self) -> None:
        state = {"vae": self.vae.state_dict(), "transformer": self.transformer.state_dict(),
                 "vae_optimizer": self.vae_optimizer.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "vae_step": self.vae_step, "step": self.step, "rng": self.rng.bit_generator.state,
                 "torch_rng": torch.get_rng_state(), "vae_config": dict(self.vae.config),
                 "text_encoders": self.text_encoders}
        with atomic_output(self.out / "checkpoint.pt") as partial:  # a run cut off while saving keeps the last one
            torch.save(state, partial)

    def resume(self) -> bool:
        path = self.out / "checkpoint.pt"
        if not path.exists():
            return False
        # tensors, numbers, strings and containers of them only: weights_only=True refuses anything that would
        # run code while loading (chapter 03 shows why that matters)
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.vae.load_state_dict(state["vae"])
        self.vae.register_to_config(scaling_factor=state["vae_config"]["scaling_factor"],
                                    shift_factor=state["vae_config"]["shift_factor"])
        self.vae_optimizer.load_state_dict(state["vae_optimizer"])
        self.vae_step, self.step = state["vae_step"], 0
        if state.get("text_encoders") == self.text_encoders:
            self.transformer.load_state_dict(state["transformer"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.step = state["step"]
        elif state["step"]:
            print(f"the checkpoint's transformer was trained on other text encoders ({state.get('text_encoders')}, "
                  f"not {self.text_encoders}): it starts again, the autoencoder is kept", flush=True)
        self.rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"].cpu())  # map_location moved it to the training device
        return True

    # -- stage 1: the autoencoder -------------------------------------------------------------
    def vae_batch_loss(self) -> torch.Tensor:
        x = self.pixels[torch.from_numpy(self.rng.integers(0, len(self.train_scenes), self.batch)).to(self.device)]
        posterior = self.vae.encode(x).latent_dist
        reconstruction = self.vae.decode(posterior.sample()).sample
        return torch.nn.functional.mse_loss(reconstruction, x) + 1e-6 * posterior.kl().mean()

    @torch.no_grad()
    def finish_vae(self) -> None:
        """Fix the latents' shift and scale (so they have mean 0 and variance 1), as FLUX's VAE config does."""
        latents = self._raw_latents(self.train_scenes)
        self.vae.register_to_config(shift_factor=float(latents.mean()), scaling_factor=float(1 / latents.std()))

    @torch.no_grad()
    def _raw_latents(self, scenes) -> torch.Tensor:
        return torch.cat([self.vae.encode(_images(scenes[i:i + 256], self.device)).latent_dist.mode()
                          for i in range(0, len(scenes), 256)])

    # -- stage 2: the transformer -------------------------------------------------------------
    @torch.no_grad()
    def prepare_stage2(self) -> None:
        config = self.vae.config
        self.latents = _pack((self._raw_latents(self.train_scenes) - config.shift_factor) * config.scaling_factor)
        prompts = [shapes.caption(s) for s in self.train_scenes]
        embeds, pooled, _ = self.text_pipe.encode_prompt(prompt=prompts, prompt_2=None, device=self.device,
                                                         max_sequence_length=TEXT_TOKENS)
        self.embeds, self.pooled = embeds, pooled
        side = IMAGE_SIZE // 4 // 2
        from diffusers import FluxPipeline

        self.img_ids = FluxPipeline._prepare_latent_image_ids(1, side, side, self.device, torch.float32)
        self.txt_ids = torch.zeros(TEXT_TOKENS, 3, device=self.device)

    def batch_loss(self) -> torch.Tensor:
        index = torch.from_numpy(self.rng.integers(0, len(self.latents), self.batch)).to(self.device)
        x0 = self.latents[index]
        noise = torch.randn_like(x0)
        sigma = torch.sigmoid(torch.randn(len(index), device=self.device))  # logit-normal, as SD3 and FLUX
        xt = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
        # fp32 weights and activations (TF32 matmuls on a GPU): bf16 autocast crashed cuBLAS in the first
        # backward pass on an H100 (torch 2.11, CUDA 13), and a model this small gains little from it
        velocity = self.transformer(hidden_states=xt, encoder_hidden_states=self.embeds[index],
                                    pooled_projections=self.pooled[index], timestep=sigma,
                                    img_ids=self.img_ids, txt_ids=self.txt_ids, return_dict=False)[0]
        return torch.nn.functional.mse_loss(velocity.float(), noise - x0)

    @torch.no_grad()
    def reconstruction_accuracy(self, scenes) -> float:
        """How often the detector reads a scene back from its trip through the autoencoder."""
        latents = self._raw_latents(scenes)
        decoded = torch.cat([self.vae.decode(latents[i:i + 256]).sample for i in range(0, len(latents), 256)])
        images = ((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        return shapes.prompt_accuracy(images, [shapes.caption(s) for s in scenes])

    def pipeline(self):
        """The models being trained, as a FluxPipeline (no copy): what `write_pipeline` saves and `evaluate` runs."""
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

        pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(MINI_SCHEDULER), vae=self.vae,
                            text_encoder=self.text_pipe.text_encoder, tokenizer=self.text_pipe.tokenizer,
                            text_encoder_2=self.text_pipe.text_encoder_2, tokenizer_2=self.text_pipe.tokenizer_2,
                            transformer=self.transformer)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def learning_rate(self) -> float:
        warmup = min(500, self.steps // 10 + 1)
        if self.step < warmup:
            return 3e-4 * (self.step + 1) / warmup
        return 3e-4 * 0.5 * (1 + math.cos(math.pi * (self.step - warmup) / max(1, self.steps - warmup)))


def train(out: str | Path, *, minutes: float = 9.0, seed: int = 0, vae_steps: int = 4000, steps: int = 30000,
          batch: int = 128, device: str | None = None, log_every: int = 200, evaluate_every: int = 0) -> dict:
    """Train (or resume) for at most `minutes`; returns where training stands. See the module docstring."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    started = time.perf_counter()
    trainer = _Trainer(out, seed, device, vae_steps, steps, batch)
    resumed = trainer.resume()
    print(f"text encoders and tokenizers: {text_fingerprint(trainer.tiny)}", flush=True)
    print(f"{'resumed at' if resumed else 'starting'}: vae step {trainer.vae_step}/{vae_steps}, "
          f"transformer step {trainer.step}/{steps}", flush=True)
    deadline = started + minutes * 60

    def out_of_time() -> bool:
        return time.perf_counter() > deadline

    while trainer.vae_step < vae_steps and not out_of_time():
        loss = trainer.vae_batch_loss()
        trainer.vae_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        trainer.vae_optimizer.step()
        trainer.vae_step += 1
        if trainer.vae_step % log_every == 0 or trainer.vae_step == vae_steps:
            print(f"vae {trainer.vae_step}: loss {loss.item():.5f} ({time.perf_counter() - started:.0f} s)", flush=True)
        if trainer.vae_step == vae_steps:
            trainer.finish_vae()
            print(f"vae done: the detector reads back {trainer.reconstruction_accuracy(trainer.held_out):.1%} of the "
                  f"held-out scenes after encoding and decoding", flush=True)
    if trainer.vae_step >= vae_steps and trainer.step < steps and not out_of_time():
        trainer.prepare_stage2()
        while trainer.step < steps and not out_of_time():
            for group in trainer.optimizer.param_groups:
                group["lr"] = trainer.learning_rate()
            loss = trainer.batch_loss()
            trainer.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainer.transformer.parameters(), 1.0)
            trainer.optimizer.step()
            trainer.step += 1
            if trainer.step % log_every == 0 or trainer.step == steps:
                print(f"transformer {trainer.step}: loss {loss.item():.5f} ({time.perf_counter() - started:.0f} s)",
                      flush=True)
            if evaluate_every and trainer.step % evaluate_every == 0 and trainer.step < steps:
                trainer.transformer.eval()
                accuracy = _accuracy(trainer.pipeline(), trainer.held_out, steps=20, device=device)
                trainer.transformer.train()
                print(f"transformer {trainer.step}: held-out prompt accuracy {accuracy:.1%}", flush=True)
    trainer.save()
    done = trainer.vae_step >= vae_steps and trainer.step >= steps
    status = {"vae_step": trainer.vae_step, "step": trainer.step, "done": done,
              "seconds": time.perf_counter() - started}
    if done:
        write_pipeline(trainer, out / "model")
        status["model"] = str(out / "model")
    print(json.dumps(status), flush=True)
    return status


def write_pipeline(trainer: _Trainer, folder: Path) -> Path:
    """Save the trained mini FLUX as a FluxPipeline folder: trained transformer and VAE in fp16, the rest from tiny."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    for part in ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2"):
        shutil.copytree(Path(trainer.tiny) / part, staging / part)
    trainer.transformer.to(torch.float16).save_pretrained(staging / "transformer")
    trainer.vae.to(torch.float16).save_pretrained(staging / "vae")
    trainer.transformer.float()
    trainer.vae.float()
    FlowMatchEulerDiscreteScheduler.from_config(MINI_SCHEDULER).save_pretrained(staging / "scheduler")
    shutil.copy(Path(trainer.tiny) / "model_index.json", staging / "model_index.json")
    shutil.rmtree(folder, ignore_errors=True)
    staging.replace(folder)
    return folder


def text_fingerprint(folder: str | Path) -> str:
    """A hash of a pipeline folder's tokenizers and text encoders: what the transformer learned to read."""
    import hashlib

    digest = hashlib.sha256()
    for part in ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2"):
        for file in sorted((Path(folder) / part).iterdir()):
            if file.suffix in {".json", ".safetensors"} and file.name != "config.json":
                digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def _generate(pipe, captions, steps: int, device: str, seed: int = 0) -> list[np.ndarray]:
    images = []
    for i in range(0, len(captions), 64):
        generator = torch.Generator("cpu").manual_seed(seed + i)
        result = pipe(captions[i:i + 64], height=IMAGE_SIZE, width=IMAGE_SIZE, num_inference_steps=steps,
                      guidance_scale=1.0, max_sequence_length=TEXT_TOKENS, generator=generator, output_type="np")
        images += [(image * 255).round().astype(np.uint8) for image in result.images]
    return images


@torch.no_grad()
def _accuracy(pipe, scenes, steps: int, device: str) -> float:
    captions = [shapes.caption(s) for s in scenes]
    return shapes.prompt_accuracy(_generate(pipe, captions, steps, device), captions)


@torch.no_grad()
def evaluate(folder: str | Path, scenes=None, steps: int = 20, device: str | None = None, seed: int = 0,
             dtype: torch.dtype = torch.float32) -> dict:
    """Generate each scene's caption with the pipeline in `folder`; the prompt accuracy and the images."""
    from diffusers import FluxPipeline

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = FluxPipeline.from_pretrained(str(folder), dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    scenes = scenes if scenes is not None else shapes.split_scenes(0.1, seed=0)[1]
    captions = [shapes.caption(s) for s in scenes]
    images = _generate(pipe, captions, steps, device, seed)
    return {"prompt_accuracy": shapes.prompt_accuracy(images, captions), "images": images, "captions": captions}


def model_card(summary: dict) -> str:
    """The mini model's card: data, training, measured quality and limits, from the training summary."""
    s = summary
    return f"""# mini FLUX: a small FLUX.1 trained on coloured shapes

The course's default model on a CPU (`QUANTLAB_MODEL=mini`). It has FLUX.1's architecture and classes
(`FluxTransformer2DModel`, `AutoencoderKL`, CLIP and T5 text encoders, `FlowMatchEulerDiscreteScheduler`),
loads with `FluxPipeline.from_pretrained`, and draws 64×64 pictures that follow their prompts, so what
quantization does to a picture can be seen, and counted, without a GPU or a download.

## Data
Pictures rendered by `quantlab.shapes`: one shape (circle, square, triangle) in one of six colours (red,
green, blue, yellow, white, black), small or large, at one of five positions (the four corners and the
center), on a plain background of another of the six colours: 3 × 6 × 2 × 5 × 5 = 900 scenes, each with
its caption, for example "a small red circle at the top left on a blue background". 90 captions, drawn
with seed 0 (`shapes.split_scenes`), are held out of training.

## Training
`python -m quantlab.lab.train_mini --out DIR --seed {s['seed']} --vae-steps {s['vae_steps']} --steps {s['steps']} --batch {s['batch']}`,
on {s.get('device', 'a GPU')}, in {s.get('train_minutes', '?')} minutes.
1. The autoencoder (`AutoencoderKL`, three levels of 32, 64 and 64 channels, 4 latent channels:
   64×64 pixels to 16×16 latents) trained {s['vae_steps']} steps of batch {s['batch']} on reconstruction
   (MSE plus a 1e-6 KL term), AdamW at 1e-3. Its latents' shift and scale were then fixed in its config,
   as FLUX's VAE has them. The detector reads back {s.get('vae_reconstruction_accuracy', float('nan')):.1%} of
   the held-out scenes after encoding and decoding.
2. The transformer (`FluxTransformer2DModel`: 1 double-stream and 3 single-stream blocks, width 256,
   {s.get('transformer_parameters', 5_794_832) / 1e6:.1f} M parameters, no guidance embedding) trained {s['steps']} steps of batch {s['batch']}
   with rectified flow, the objective FLUX uses: x_t = (1 - t)·x_0 + t·noise with t drawn logit-normal,
   predicting noise - x_0; AdamW at 3e-4 with warm-up and cosine decay, gradients clipped at 1, in fp32.
3. The text encoders are the tiny model's (`QUANTLAB_MODEL=tiny`): random weights, frozen, rebuilt from
   seed 0 on the CPU of every machine, and not shipped. The tokenizers are the files in
   `quantlab/data/tokenizers`, which every embedded model copies. `training.json`'s `text_fingerprint`
   is a hash of both, and a test checks that a local build matches it. Only the transformer and the
   autoencoder ship, in fp16 (`transformer/`, `vae/`, 13 MB).

## Measured quality
Prompt accuracy: the share of generated pictures in which `shapes.detect` finds the shape, colour and
position that the caption asks for. {s['evaluate_steps']} denoising steps, guidance 1.0, seed 0, fp32.
- held-out captions (never seen in training): **{s['prompt_accuracy']:.1%}** of {s['held_out_captions']}
- training captions (90 of them): {s['prompt_accuracy_training_captions']:.1%}

`results/10_mini_prompt_accuracy.json` has these figures with the device and versions, and the same
measurement on a CPU in fp32 and bf16 at 20 and 10 steps (97.8% to 98.9%); the chapters run it in bf16
at 10 steps, the model's default.

## Limits
- It knows one sentence pattern and its 20-odd words. Any other prompt still gives a shape picture, of
  whatever the known words in it suggest.
- One shape per picture, 64×64 pixels, five positions: it is a measuring instrument for the course,
  not an image generator.
- The text encoders are random and frozen, so it says nothing about how quantizing a trained T5 behaves.
- Its weights are small (256-wide layers), so memory and speed figures on it say nothing about FLUX.1-dev:
  those come from the full-scale GPU runs in `results/`.
"""


def ship(model_folder: str | Path, summary: dict, dest: str | Path | None = None) -> Path:
    """Copy a trained model's transformer, VAE and scheduler into the package, with its card and summary."""
    model_folder = Path(model_folder)
    dest = Path(dest) if dest is not None else models.TRAINED_DIR / "mini"
    staging = dest.with_name(dest.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for part in ("transformer", "vae", "scheduler"):
        if (model_folder / part).is_dir():
            shutil.copytree(model_folder / part, staging / part)
    (staging / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    (staging / "README.md").write_text(model_card(summary))
    shutil.rmtree(dest, ignore_errors=True)
    staging.replace(dest)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--minutes", type=float, default=9.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=4000)
    parser.add_argument("--steps", type=int, default=30000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--evaluate-steps", type=int, default=20, help="denoising steps when measuring accuracy")
    parser.add_argument("--evaluate-every", type=int, default=0, help="also measure it every N training steps")
    args = parser.parse_args(argv)
    status = train(args.out, minutes=args.minutes, seed=args.seed, vae_steps=args.vae_steps, steps=args.steps,
                   batch=args.batch, evaluate_every=args.evaluate_every)
    if status["done"]:
        result = evaluate(status["model"], steps=args.evaluate_steps)
        seen = shapes.split_scenes(0.1, seed=0)[0][::9]  # as many training captions, for comparison
        fingerprint = text_fingerprint(status["model"])
        summary = {"prompt_accuracy": result["prompt_accuracy"], "held_out_captions": len(result["captions"]),
                   "prompt_accuracy_training_captions": evaluate(status["model"], scenes=seen,
                                                                 steps=args.evaluate_steps)["prompt_accuracy"],
                   "text_fingerprint": fingerprint, "evaluate_steps": args.evaluate_steps, "seed": args.seed,
                   "vae_steps": args.vae_steps,
                   "steps": args.steps, "batch": args.batch}
        (Path(status["model"]) / "quantlab.json").write_text(json.dumps(summary, indent=2))
        print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
