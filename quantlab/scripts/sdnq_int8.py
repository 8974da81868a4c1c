from diffusers import FluxPipeline, PipelineQuantizationConfig, SDNQConfig

# SDNQ int8: the transformer's Linears quantized while they load, one float32 scale per output row
quantization_config = PipelineQuantizationConfig(quant_mapping={"transformer": SDNQConfig(weights_dtype="int8")})
