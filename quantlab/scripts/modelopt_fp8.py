from diffusers import FluxPipeline, NVIDIAModelOptConfig, PipelineQuantizationConfig

# NVIDIA ModelOpt FP8: the transformer's weights quantized while they load (nvidia-modelopt 0.37.0), one scale per
# weight tensor; the activations stay in DTYPE (weight_only=True is the default)
quantization_config = PipelineQuantizationConfig(quant_mapping={"transformer": NVIDIAModelOptConfig(quant_type="FP8")})
