pipe = FluxPipeline.from_pretrained(MODEL_ID, quantization_config=quantization_config, dtype=DTYPE).to(DEVICE)
