"""The host layer: the ComfyUI machinery shared by the pack's nodes."""
