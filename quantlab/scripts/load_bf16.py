from diffusers import FluxPipeline

pipe = FluxPipeline.from_pretrained(MODEL_ID, dtype=DTYPE).to(DEVICE)
