# every component straight to the GPU, the transformer and T5 quantized while they load: the pipeline keeps its
# text encoders, so it takes a prompt as usual
pipe = FluxPipeline.from_pretrained(MODEL_ID, quantization_config=quantization_config, dtype=DTYPE,
                                    device_map=DEVICE)
