"""ComfyUI nodes of the reference world (not part of the pack: linked into the benchmark's, the demo's and the
tests' ComfyUI base directory next to the pack, like the digits model's nodes).

- World Image Model Loader: the SD1.5-family image model from ``models/diffusion_models`` (ComfyUI's
  ``detect_unet_config`` reads the architecture; the family class is ``supported_models.SD15``, because
  ComfyUI's family matcher only accepts 320-channel SD1.5 UNets; v-prediction when the file has the
  ``v_pred`` marker key, ComfyUI's own marker for SDXL v models). The video model loads with UNETLoader.
- World Prompt: scene or video prompts (one per line, each repeated) → CONDITIONING with the fixed token
  embedding; ConditioningZeroOut of it is the null conditioning.
- World Decode: the linear VAE's inverse, LATENT → IMAGE (video frames as a batch of images).
- World VAE: the linear image VAE as a ComfyUI VAE (VAEDecode, DiffuseHigh).
- World Inpaint Source: scenes (one per line) rendered and encoded → LATENT, with the MASK of one cell each.
"""

import os
import sys

_HERE = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import torch  # noqa: E402
from sceneworld import conditioning, vae, world  # noqa: E402

CATEGORY = "free_guidance_reference"


def _lines(text: str, node: str, field: str) -> list[str]:
    lines = [line.strip() for line in text.replace("|", "\n").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{node}: input '{field}' has no prompt")
    return lines


def load_image_model(path: str):
    """A ModelPatcher of the world's image model (SD1.5 family, see the module doc)."""
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher
    import comfy.utils
    from sceneworld.model import V_PRED_KEY, build_image_model

    sd = comfy.utils.load_torch_file(path)
    unet_config = comfy.model_detection.detect_unet_config(sd, "")
    if unet_config is None or "model_channels" not in unet_config:
        raise ValueError(f"World Image Model Loader: {path} is not a UNet state dict")
    v_prediction = sd.pop(V_PRED_KEY, None) is not None
    model = build_image_model(unet_config, v_prediction=v_prediction)
    model.load_model_weights(sd, "")
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(
        model, load_device=device, offload_device=comfy.model_management.unet_offload_device()
    )


class WorldImageModelLoader:
    DESCRIPTION = (
        "Load the reference world's image model (SD1.5 family, v-prediction) from models/diffusion_models."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        return {"required": {"unet_name": (folder_paths.get_filename_list("diffusion_models"),)}}

    def load(self, unet_name: str):
        import folder_paths

        return (load_image_model(folder_paths.get_full_path_or_raise("diffusion_models", unet_name)),)


class WorldPrompt:
    DESCRIPTION = (
        "The reference world's prompts → CONDITIONING (fixed token embedding). Image: 'red circle small "
        "top-left, blue square large bottom-right; textured background'. Video: 'red circle right fast, blue "
        "cross up slow'. One prompt per line (or '|'), each repeated 'repeat' times in a row."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "prompts": ("STRING", {"multiline": True, "default": "red circle small top-left"}),
                "kind": (["image", "video"],),
                "repeat": ("INT", {"default": 1, "min": 1, "max": 4096}),
            }
        }

    def encode(self, prompts: str, kind: str, repeat: int):
        lines = _lines(prompts, "World Prompt", "prompts")
        parse = world.parse_scene if kind == "image" else world.parse_video
        try:
            items = [parse(line) for line in lines for _ in range(repeat)]
        except ValueError as error:
            raise ValueError(f"World Prompt: input 'prompts': {error}") from None
        context = conditioning.embed_scenes(items) if kind == "image" else conditioning.embed_videos(items)
        return ([[context, {}]],)


class WorldDecode:
    DESCRIPTION = "The reference world's linear VAE decoder: LATENT → IMAGE (video frames as images)."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "samples": ("LATENT",),
                "zoom": ("INT", {"default": 1, "min": 1, "max": 16}),
            }
        }

    def decode(self, samples, zoom: int):
        latent = samples["samples"].cpu()
        if latent.ndim == 5:
            frames = vae.decode_video_latent(latent)  # (B, 3, T, H, W)
            images = frames.permute(0, 2, 3, 4, 1).reshape(-1, frames.shape[3], frames.shape[4], 3)
        elif latent.ndim == 4 and latent.shape[1] == 4:
            images = vae.decode_image_latent(latent).permute(0, 2, 3, 1)
        else:
            raise ValueError(
                f"World Decode: input 'samples' has shape {tuple(latent.shape)}; not a world latent"
            )
        if zoom > 1:
            images = images.repeat_interleave(zoom, 1).repeat_interleave(zoom, 2)
        return (images.contiguous().to(torch.float32),)


class LinearDecoder(torch.nn.Module):
    """The linear decoder as a ComfyUI ``first_stage_model``: LATENT → RGB in [-1, 1], differentiable, not
    clamped (what the pack's objectives back-propagate through, like a real VAE's decoder)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("hadamard", vae.hadamard(4).clone())  # its "weights" (made autograd-ready)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        z = vae.image_process_in(latent) / vae.IMAGE_GAIN
        return torch.einsum("ij,njhw->nihw", self.hadamard.to(z), z)[:, :3]  # = 2·latent_to_image − 1


class LinearImageVAE:
    """The image model's linear VAE as a ComfyUI VAE for nodes that take one (VAEDecode, VAEEncode, DiffuseHigh,
    the pack's image objectives through ``first_stage_model``/``patcher``/``process_output``, as on comfy.sd.VAE).

    One latent pixel per image pixel: ``downscale_ratio`` is 1 (a node's "pixel" width is the latent width).
    """

    downscale_ratio = 1
    upscale_ratio = 1
    latent_channels = 4
    latent_dim = 2
    output_channels = 3
    vae_dtype = torch.float32

    def __init__(self):
        import comfy.model_management
        import comfy.model_patcher

        self.device = comfy.model_management.get_torch_device()
        self.first_stage_model = LinearDecoder()
        self.patcher = comfy.model_patcher.ModelPatcher(
            self.first_stage_model, load_device=self.device, offload_device=torch.device("cpu")
        )

    def process_output(self, image: torch.Tensor) -> torch.Tensor:
        return torch.clamp((image + 1.0) / 2.0, min=0.0, max=1.0)  # comfy.sd.VAE's, for images

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        return vae.decode_image_latent(samples.cpu()).permute(0, 2, 3, 1).contiguous()

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return vae.encode_image_latent(pixels[..., :3].cpu().movedim(-1, 1))

    def spacial_compression_decode(self) -> int:
        return 1

    def spacial_compression_encode(self) -> int:
        return 1

    def temporal_compression_decode(self):
        return None


class WorldVAE:
    DESCRIPTION = "The reference world's linear image VAE (exact inverse; one latent pixel per image pixel)."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("VAE",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def load(self):
        return (LinearImageVAE(),)


class WorldInpaintSource:
    DESCRIPTION = (
        "Render and encode scenes (one per line) as a LATENT, with the MASK of one cell per scene "
        "(positions: one per line, or one for all) for SetLatentNoiseMask."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT", "MASK")
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "scenes": ("STRING", {"multiline": True, "default": "red circle small top-left"}),
                "positions": ("STRING", {"multiline": True, "default": "top-left"}),
                "repeat": ("INT", {"default": 1, "min": 1, "max": 4096}),
            }
        }

    def build(self, scenes: str, positions: str, repeat: int):
        lines = _lines(scenes, "World Inpaint Source", "scenes")
        cells = _lines(positions, "World Inpaint Source", "positions")
        if len(cells) == 1:
            cells = cells * len(lines)
        if len(cells) != len(lines) or any(c not in world.POSITIONS for c in cells):
            raise ValueError(
                f"World Inpaint Source: input 'positions' needs one of {world.POSITIONS} per scene "
                f"({len(lines)}), got {cells}"
            )
        try:
            items = [world.parse_scene(line) for line in lines]
        except ValueError as error:
            raise ValueError(f"World Inpaint Source: input 'scenes': {error}") from None
        images = world.scene_batch(items).repeat_interleave(repeat, 0)
        masks = torch.stack([torch.from_numpy(world.cell_mask(c)).float() for c in cells])
        return {"samples": vae.encode_image_latent(images)}, masks.repeat_interleave(repeat, 0)


NODE_CLASS_MAPPINGS = {
    "WorldRefImageModelLoader": WorldImageModelLoader,
    "WorldRefPrompt": WorldPrompt,
    "WorldRefDecode": WorldDecode,
    "WorldRefInpaintSource": WorldInpaintSource,
    "WorldRefVAE": WorldVAE,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "WorldRefImageModelLoader": "World Image Model Loader (reference world)",
    "WorldRefPrompt": "World Prompt (reference world)",
    "WorldRefDecode": "World Decode (reference world)",
    "WorldRefInpaintSource": "World Inpaint Source (reference world)",
    "WorldRefVAE": "World VAE (reference world)",
}
