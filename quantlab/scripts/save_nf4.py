from diffusers import FluxTransformer2DModel

# once: quantize the transformer to NF4 while it loads, and save it in that form (one file: diffusers 0.42
# looks for each weight's NF4 statistics in the weight's own shard)
transformer = FluxTransformer2DModel.from_pretrained(
    MODEL_ID, subfolder="transformer", quantization_config=transformer_config, dtype=DTYPE, device_map=DEVICE)
transformer.save_pretrained(f"{NF4_CHECKPOINT}/transformer")
del transformer
torch.cuda.empty_cache()
