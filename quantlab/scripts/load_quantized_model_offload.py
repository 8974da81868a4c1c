pipe = FluxPipeline.from_pretrained(MODEL_ID, quantization_config=quantization_config, dtype=DTYPE)
# each component moves to the GPU when it runs and back to host RAM after: the GPU holds one at a time
pipe.enable_model_cpu_offload()
