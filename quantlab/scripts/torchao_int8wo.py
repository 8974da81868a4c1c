from diffusers import FluxPipeline, PipelineQuantizationConfig, TorchAoConfig
from torchao.quantization import Int8WeightOnlyConfig
from transformers import TorchAoConfig as TransformersTorchAoConfig

# torchao int8 weight-only: one scale per output row, computed in DTYPE; T5 through transformers' own config
quantization_config = PipelineQuantizationConfig(quant_mapping={
    "transformer": TorchAoConfig(Int8WeightOnlyConfig()),
    "text_encoder_2": TransformersTorchAoConfig(Int8WeightOnlyConfig()),
})
