image = pipe(prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds, height=HEIGHT, width=WIDTH,
             num_inference_steps=STEPS, guidance_scale=GUIDANCE,
             generator=torch.Generator("cpu").manual_seed(SEED)).images[0]
print(f"peak GPU memory: {torch.cuda.max_memory_reserved() / 2**30:.2f} GiB")
