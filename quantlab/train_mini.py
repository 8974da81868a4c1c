"""Train the mini FLUX on coloured shapes, in steps of a few minutes that resume where they stopped.

    python -m quantlab.train_mini --out DIR [--minutes 9] [--seed 0]

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

from . import models, shapes

__all__ = ["MINI_TRANSFORMER", "MINI_VAE", "MINI_SCHEDULER", "TEXT_TOKENS", "train", "evaluate", "main"]

# The transformer keeps the tiny model's widths (multiples of 256, so every backend's blocks apply)
# with fewer blocks, and reads 4-channel latents packed 2×2 (16 features).
MINI_TRANSFORMER = {**models.TINY_TRANSFORMER, "in_channels": 16, "num_layers": 1, "num_single_layers": 3,
                    "guidance_embeds": False}
# Three resolution levels: 64×64 pixels <-> 16×16 latents with 4 channels (the pipeline's vae_scale_factor is 4).
MINI_VAE = {**models.FLUX_DEV_VAE, "down_block_types": ["DownEncoderBlock2D"] * 3,
            "up_block_types": ["UpDecoderBlock2D"] * 3, "block_out_channels": [32, 64, 64], "layers_per_block": 1,
            "latent_channels": 4, "sample_size": 64, "scaling_factor": 1.0, "shift_factor": 0.0}
MINI_SCHEDULER = {**models.FLUX_DEV_SCHEDULER, "shift": 1.0, "use_dynamic_shifting": False}
TEXT_TOKENS = 32  # a caption is at most 16 words
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
        self.text_pipe = FluxPipeline.from_pretrained(self.tiny, transformer=None, vae=None, dtype=torch.float32)
        self.text_pipe.to(device)
        self.latents = self.embeds = None

    # -- checkpoints --------------------------------------------------------------------------
    def save(self) -> None:
        state = {"vae": self.vae.state_dict(), "transformer": self.transformer.state_dict(),
                 "vae_optimizer": self.vae_optimizer.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "vae_step": self.vae_step, "step": self.step, "rng": self.rng.bit_generator.state,
                 "torch_rng": torch.get_rng_state(), "vae_config": dict(self.vae.config)}
        partial = self.out / "checkpoint.pt.partial"
        torch.save(state, partial)
        partial.replace(self.out / "checkpoint.pt")  # a run cut off while saving keeps the previous checkpoint

    def resume(self) -> bool:
        path = self.out / "checkpoint.pt"
        if not path.exists():
            return False
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.vae.load_state_dict(state["vae"])
        self.vae.register_to_config(scaling_factor=state["vae_config"]["scaling_factor"],
                                    shift_factor=state["vae_config"]["shift_factor"])
        self.transformer.load_state_dict(state["transformer"])
        self.vae_optimizer.load_state_dict(state["vae_optimizer"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.vae_step, self.step = state["vae_step"], state["step"]
        self.rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        return True

    # -- stage 1: the autoencoder -------------------------------------------------------------
    def vae_batch_loss(self) -> torch.Tensor:
        scenes = [self.train_scenes[i] for i in self.rng.integers(0, len(self.train_scenes), self.batch)]
        x = _images(scenes, self.device)
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
        with torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16, enabled=self.device.startswith("cuda")):
            velocity = self.transformer(hidden_states=xt, encoder_hidden_states=self.embeds[index],
                                        pooled_projections=self.pooled[index], timestep=sigma,
                                        img_ids=self.img_ids, txt_ids=self.txt_ids, return_dict=False)[0]
        return torch.nn.functional.mse_loss(velocity.float(), noise - x0)

    def learning_rate(self) -> float:
        warmup = min(500, self.steps // 10 + 1)
        if self.step < warmup:
            return 3e-4 * (self.step + 1) / warmup
        return 3e-4 * 0.5 * (1 + math.cos(math.pi * (self.step - warmup) / max(1, self.steps - warmup)))


def train(out: str | Path, *, minutes: float = 9.0, seed: int = 0, vae_steps: int = 4000, steps: int = 30000,
          batch: int = 128, device: str | None = None, log_every: int = 200) -> dict:
    """Train (or resume) for at most `minutes`; returns where training stands. See the module docstring."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    trainer = _Trainer(out, seed, device, vae_steps, steps, batch)
    resumed = trainer.resume()
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
            print(f"vae {trainer.vae_step}: loss {loss.item():.5f}", flush=True)
        if trainer.vae_step == vae_steps:
            trainer.finish_vae()
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
                print(f"transformer {trainer.step}: loss {loss.item():.5f}", flush=True)
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
    images = []
    for i in range(0, len(captions), 64):
        batch = captions[i:i + 64]
        generator = torch.Generator("cpu").manual_seed(seed + i)
        result = pipe(batch, height=IMAGE_SIZE, width=IMAGE_SIZE, num_inference_steps=steps, guidance_scale=1.0,
                      max_sequence_length=TEXT_TOKENS, generator=generator, output_type="np")
        images += [(image * 255).round().astype(np.uint8) for image in result.images]
    return {"prompt_accuracy": shapes.prompt_accuracy(images, captions), "images": images, "captions": captions}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--minutes", type=float, default=9.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=4000)
    parser.add_argument("--steps", type=int, default=30000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--evaluate-steps", type=int, default=20, help="denoising steps when measuring accuracy")
    args = parser.parse_args(argv)
    status = train(args.out, minutes=args.minutes, seed=args.seed, vae_steps=args.vae_steps, steps=args.steps,
                   batch=args.batch)
    if status["done"]:
        result = evaluate(status["model"], steps=args.evaluate_steps)
        summary = {"prompt_accuracy": result["prompt_accuracy"], "held_out_captions": len(result["captions"]),
                   "evaluate_steps": args.evaluate_steps, "seed": args.seed, "vae_steps": args.vae_steps,
                   "steps": args.steps, "batch": args.batch}
        (Path(status["model"]) / "quantlab.json").write_text(json.dumps(summary, indent=2))
        print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
