import gc

from diffusers import FluxPipeline

# CLIP and T5 alone, straight to the GPU: encode the prompt, then free them before the transformer arrives
text_pipe = FluxPipeline.from_pretrained(MODEL_ID, transformer=None, vae=None, dtype=DTYPE, device_map=DEVICE)
with torch.inference_mode():
    prompt_embeds, pooled_prompt_embeds, _ = text_pipe.encode_prompt(
        PROMPT, prompt_2=None, max_sequence_length=MAX_SEQUENCE_LENGTH)
del text_pipe
gc.collect()
torch.cuda.empty_cache()
