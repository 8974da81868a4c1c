from diffusers import TorchAoConfig
from torchao.quantization import Int8WeightOnlyConfig

transformer_config = TorchAoConfig(Int8WeightOnlyConfig())  # quantized on the GPU, layer by layer, as it loads
