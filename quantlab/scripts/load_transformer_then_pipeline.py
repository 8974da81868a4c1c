from diffusers import FluxPipeline, FluxTransformer2DModel

# the transformer quantized while it loads, straight to the GPU; then the VAE joins it (no text encoders)
transformer = FluxTransformer2DModel.from_pretrained(
    MODEL_ID, subfolder="transformer", quantization_config=transformer_config, dtype=DTYPE, device_map=DEVICE)
pipe = FluxPipeline.from_pretrained(
    MODEL_ID, transformer=transformer, text_encoder=None, text_encoder_2=None, dtype=DTYPE).to(DEVICE)
