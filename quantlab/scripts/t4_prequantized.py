from diffusers import FluxPipeline, FluxTransformer2DModel

# a transformer saved in NF4 (diffusers/FLUX.1-dev-bnb-4bit on the Hub is one, or NF4_DIR saved by save_nf4):
# its config carries the quantization, so no quantization_config is needed
transformer = FluxTransformer2DModel.from_pretrained(NF4_CHECKPOINT, subfolder="transformer", dtype=DTYPE,
                                                     device_map=DEVICE)
pipe = FluxPipeline.from_pretrained(
    MODEL_ID, transformer=transformer, text_encoder=None, text_encoder_2=None, dtype=DTYPE).to(DEVICE)
