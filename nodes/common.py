"""Strings shared by the node schemas."""

CATEGORY = "sampling/guidance"
MODEL_TOOLTIP = (
    "The diffusion model to patch. The input model is left unchanged; a patched clone is returned."
)
