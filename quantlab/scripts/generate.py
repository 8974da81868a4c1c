image = pipe(PROMPT, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
             max_sequence_length=MAX_SEQUENCE_LENGTH, generator=torch.Generator("cpu").manual_seed(SEED)).images[0]
if torch.cuda.is_available():
    print(f"peak GPU memory: {torch.cuda.max_memory_reserved() / 2**30:.2f} GiB")
else:
    import resource  # a CPU's peak: the process's largest resident size (in KiB on Linux)
    print(f"peak host memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
