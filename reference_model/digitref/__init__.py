"""The digits reference model: a class-conditional SD3-family (MMDiT) flow model trained on sklearn's digits.

Modules:
- ``data``: the real digits (sklearn ``load_digits``), up-sampling to 32×32, augmentation, and the fixed
  linear "VAE" between 32×32 grey images and the SD3 family's 16-channel 8×8 latents (exact inverse).
- ``conditioning``: the fixed per-class conditioning (context token + pooled vector) and the null one.
- ``host``: importing the pinned ComfyUI (for scripts that run outside a ComfyUI process).
- ``model``: the model's ComfyUI config, its full initial state dict, the SD3 training objective, training.
- ``classifier``: the independent digit classifier used to score samples.
- ``metrics``: accuracy, requested-class probability, Fréchet distance, diversity.
- ``plot``: small Pillow line charts (benchmark plot, loss curve).

Nothing here imports ComfyUI at module level except ``model`` (through ``host``).
"""
