"""ComfyUI adapters: one module per technique, each exporting NODE_CLASS_MAPPINGS and display names."""

from . import cfg_interval, diffusehigh, evaluation_counter, fouriscale

NODE_MODULES = [cfg_interval, evaluation_counter, fouriscale, diffusehigh]

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
for _module in NODE_MODULES:
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)
