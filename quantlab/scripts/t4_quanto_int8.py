from diffusers import QuantoConfig

transformer_config = QuantoConfig(weights_dtype="int8")
