from diffusers import FluxPipeline

pipe = FluxPipeline.from_pretrained(MODEL_ID, dtype=DTYPE)
# store the transformer's weights in float8 e4m3 and cast each layer up to DTYPE just before it runs;
# diffusers keeps the norm layers (the blocks' modulation Linears among them) and the final proj_out in DTYPE
pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=DTYPE)
pipe.to(DEVICE)
