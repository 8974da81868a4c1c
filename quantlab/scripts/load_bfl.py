from diffusers import BFLQuantizationConfig, FluxPipeline, FluxTransformer2DModel

# the transformer from a BFL fp8r single file (float8 weights, a float32 scale per row, as diffusers' quantize_fp8r
# writes them); a single file holds weights only, so the config comes from MODEL_ID, and so does the rest
transformer = FluxTransformer2DModel.from_single_file(
    BFL_FILE, quantization_config=BFLQuantizationConfig(compute_dtype=DTYPE), config=MODEL_ID,
    subfolder="transformer", dtype=DTYPE)
pipe = FluxPipeline.from_pretrained(MODEL_ID, transformer=transformer, dtype=DTYPE).to(DEVICE)
