from diffusers import FluxPipeline, PipelineQuantizationConfig

# bitsandbytes NF4: 4-bit weights in blocks of 64, computed in DTYPE, for the transformer and for T5
quantization_config = PipelineQuantizationConfig(
    quant_backend="bitsandbytes_4bit",
    quant_kwargs={"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": DTYPE},
    components_to_quantize=["transformer", "text_encoder_2"],
)
