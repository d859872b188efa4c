"""Strings and declarations shared by the node schemas."""

from .host.inputs import Input

CATEGORY = "sampling/guidance"
MODEL_TOOLTIP = (
    "The diffusion model to patch. The input model is left unchanged; a patched clone is returned."
)
UNIQUE_ID = {"unique_id": "UNIQUE_ID"}
MODEL = Input("model", "MODEL", MODEL_TOOLTIP)
