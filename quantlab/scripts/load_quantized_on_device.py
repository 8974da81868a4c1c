# torchao quantizes each weight where it is loaded, so device_map=DEVICE loads and quantizes on the GPU;
# loaded on the CPU, the 12B transformer was still being quantized there after six minutes
pipe = FluxPipeline.from_pretrained(MODEL_ID, quantization_config=quantization_config, dtype=DTYPE, device_map=DEVICE)
