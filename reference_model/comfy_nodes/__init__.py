"""ComfyUI nodes of the digits reference model (not part of the pack: linked into the demo's, the benchmark's
and the tests' ComfyUI base directory next to the pack, the way ``tests/test_pack`` is).

- Digits Class Conditioning: the fixed class conditioning for a list of digits → CONDITIONING (the null
  conditioning is ComfyUI's own ConditioningZeroOut of it).
- Digits Decode: the linear "VAE" decoder, LATENT → IMAGE.
The model itself loads with ComfyUI's UNETLoader (``digits_sd3.safetensors``, detected as SD3); the empty
latent is ComfyUI's EmptySD3LatentImage at 64×64 (8×8 latents).
"""

import os
import sys

_HERE = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import torch  # noqa: E402
from digitref import conditioning, data  # noqa: E402

CATEGORY = "free_guidance_reference"


def parse_digits(digits: str, repeat: int) -> list[int]:
    """ "0123456789" or "3, 5, 7" → the class list, each digit repeated ``repeat`` times in a row."""
    values = [int(ch) for ch in digits if ch.isdigit()]
    if not values:
        raise ValueError(f"Digits Class Conditioning: input 'digits' has no digit 0-9 in {digits!r}")
    return [d for d in values for _ in range(repeat)]


class DigitsClassConditioning:
    DESCRIPTION = (
        "The digits reference model's fixed class conditioning: one batch entry per listed digit (each "
        "repeated 'repeat' times). Use an EmptySD3LatentImage of the same batch size; ConditioningZeroOut of "
        "this is the model's null (unconditional) conditioning."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "digits": ("STRING", {"default": "0123456789", "tooltip": "The classes, e.g. 0123456789."}),
                "repeat": (
                    "INT",
                    {"default": 1, "min": 1, "max": 4096, "tooltip": "Samples per listed digit (in a row)."},
                ),
            }
        }

    def encode(self, digits: str, repeat: int):
        return (conditioning.comfy_conditioning(parse_digits(digits, repeat)),)


class DigitsDecode:
    DESCRIPTION = (
        "Decode the digits reference model's latents with its fixed linear 'VAE' (exact inverse of the "
        "encoding): LATENT (16×8×8) → 32×32 grey IMAGE, optionally enlarged (nearest) for viewing."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "samples": ("LATENT", {"tooltip": "The sampler's output."}),
                "zoom": (
                    "INT",
                    {"default": 1, "min": 1, "max": 16, "tooltip": "Nearest-neighbour enlargement."},
                ),
            }
        }

    def decode(self, samples, zoom: int):
        images = data.decode_comfy_latent(samples["samples"].cpu())
        if zoom > 1:
            images = images.repeat_interleave(zoom, 1).repeat_interleave(zoom, 2)
        return (images[..., None].repeat(1, 1, 1, 3).to(torch.float32),)


NODE_CLASS_MAPPINGS = {
    "DigitsRefClassConditioning": DigitsClassConditioning,
    "DigitsRefDecode": DigitsDecode,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "DigitsRefClassConditioning": "Digits Class Conditioning (reference model)",
    "DigitsRefDecode": "Digits Decode (reference model)",
}
