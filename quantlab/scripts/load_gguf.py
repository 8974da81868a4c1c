from diffusers import FluxPipeline, FluxTransformer2DModel, GGUFQuantizationConfig

# the transformer from one GGUF file (a URL on the Hub, or a local path); the rest of the pipeline from MODEL_ID
transformer = FluxTransformer2DModel.from_single_file(
    GGUF_FILE, quantization_config=GGUFQuantizationConfig(compute_dtype=DTYPE), config=MODEL_ID,
    subfolder="transformer", dtype=DTYPE)
pipe = FluxPipeline.from_pretrained(MODEL_ID, transformer=transformer, dtype=DTYPE).to(DEVICE)
