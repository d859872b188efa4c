"""ComfyUI adapters: one module per technique, each exporting NODE_CLASS_MAPPINGS and display names."""

from . import (
    adaptive_guidance,
    cfg_cache,
    cfg_interval,
    cfg_pp,
    cfg_schedule,
    diffusehigh,
    evaluation_counter,
    faster_cache,
    fouriscale,
    icg,
    linear_ag,
    nasa,
    negtome,
    objectives,
    pag,
    pcg,
    sag,
    scfg,
    scg,
    seg,
    stg,
    tfg,
    tsg,
)

NODE_MODULES = [
    cfg_interval,
    adaptive_guidance,
    linear_ag,
    cfg_schedule,
    cfg_cache,
    faster_cache,
    cfg_pp,
    pcg,
    icg,
    tsg,
    pag,
    seg,
    stg,
    sag,
    fouriscale,
    diffusehigh,
    nasa,
    negtome,
    scfg,
    objectives,
    tfg,
    scg,
    evaluation_counter,
]

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
for _module in NODE_MODULES:
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)
