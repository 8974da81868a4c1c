from diffusers import FluxPipeline

pipe = FluxPipeline.from_pretrained(MODEL_ID, dtype=DTYPE).to(DEVICE)
pipe.transformer.fuse_qkv_projections()  # one matmul for q, k and v in every attention: the same output
pipe.transformer.compile_repeated_blocks(fullgraph=True)  # each block class compiled once, reused by all 57 blocks
