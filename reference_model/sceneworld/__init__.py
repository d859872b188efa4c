"""The reference world: procedural scenes and videos with ground truth, two trained models in ComfyUI
families (SD1.5 images, Wan 2.1 videos), their linear VAEs, token conditioning, classifier and metrics.

See reference_model/WORLD.md (the model cards)."""
