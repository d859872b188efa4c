"""Import the pinned ComfyUI from a script (training, benchmark): the digits model's helper, shared."""

from digitref.host import comfyui_dir, ensure_comfy

__all__ = ["comfyui_dir", "ensure_comfy"]
