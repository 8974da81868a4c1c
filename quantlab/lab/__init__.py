"""quantlab.lab: what makes results/, apart from what the chapters call. Chapters never import it.

One runner loop (`runner.run_scenarios`) serves every tool, each a command line:

- `python -m quantlab.lab.bench`: recipes end to end on a model (chapters 00-05, 07, 08), or as chapter 07 compares
  them against a bf16 reference;
- `python -m quantlab.lab.speed`: speed recipes on the transformer alone, in a pipeline, and micro-benchmarks
  (attention, matmuls, the VAE, compute-only replays); the hand-written steps (`hand_written`, `kernels`);
- `python -m quantlab.lab.t4`: the low-RAM scripts on a simulated Colab T4 (`t4_plan` predicts them);
- `python -m quantlab.lab.train_mini`: trains the mini model;
- `python -m quantlab.lab.colab`: writes colab/ (`make colab`).
"""
