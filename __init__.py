"""comfyui-free-guidance: training-free guidance techniques as ComfyUI nodes.

Registered with ComfyUI's classic (V1) node API; see README.md, "For contributors", for why.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
