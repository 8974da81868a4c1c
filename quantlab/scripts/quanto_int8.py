from diffusers import FluxPipeline, PipelineQuantizationConfig, QuantoConfig
from transformers import QuantoConfig as TransformersQuantoConfig

# Quanto int8 weights; diffusers names the argument weights_dtype, transformers names it weights
quantization_config = PipelineQuantizationConfig(quant_mapping={
    "transformer": QuantoConfig(weights_dtype="int8"),
    "text_encoder_2": TransformersQuantoConfig(weights="int8"),
})
