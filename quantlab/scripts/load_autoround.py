from diffusers import FluxPipeline, FluxTransformer2DModel

# a transformer that the auto-round library quantized beforehand (W4A16): its config.json carries the
# AutoRoundConfig, so from_pretrained needs none; a 16-bit dtype, which auto-round's kernels compute in
transformer = FluxTransformer2DModel.from_pretrained(AUTOROUND_FOLDER, subfolder="transformer", dtype=DTYPE)
pipe = FluxPipeline.from_pretrained(MODEL_ID, transformer=transformer, dtype=DTYPE).to(DEVICE)
