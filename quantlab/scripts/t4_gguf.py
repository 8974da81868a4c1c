from diffusers import FluxPipeline, FluxTransformer2DModel, GGUFQuantizationConfig

# a pre-quantized GGUF file of the transformer (a URL on the Hub, or a local path), onto the GPU
transformer = FluxTransformer2DModel.from_single_file(
    GGUF_FILE, quantization_config=GGUFQuantizationConfig(compute_dtype=DTYPE), config=MODEL_ID,
    subfolder="transformer", dtype=DTYPE).to(DEVICE)
pipe = FluxPipeline.from_pretrained(
    MODEL_ID, transformer=transformer, text_encoder=None, text_encoder_2=None, dtype=DTYPE).to(DEVICE)
