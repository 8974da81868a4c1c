from diffusers import BitsAndBytesConfig

transformer_config = BitsAndBytesConfig(load_in_8bit=True)  # LLM.int8(): outlier columns stay in fp16
