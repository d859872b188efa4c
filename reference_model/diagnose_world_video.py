"""Check the world video model's sampling path against the ground truth (WORLD.md, "diagnosis").

    nice python reference_model/diagnose_world_video.py [weights.safetensors] [--shift S]

1. Rendered videos → linear VAE → Wan 2.1 ``process_out``/``process_in`` → decode: exact; the latents' RMS.
2. Per noise level σ (flow: x_t = (1 − σ)·x0 + σ·n): the model's denoised latent (ComfyUI's ``apply_model``,
   conditional and null prompt) against the true latent, as a fraction of the data variance
   (about its per-channel means), the prompt's effect |x0(cond) − x0(null)|² in the same unit (near 0: the
   model ignores the prompt), and the attribute accuracy of one-step denoising.
3. ComfyUI's sampler (``euler``/``simple``, 10 steps, the given shift; default the family's 8) from pure
   noise at CFG 1 and 3, and from the noised ground truth at steps 3, 5, 7 of 10.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

KEYS = {
    "prompt_accuracy": "prompt",
    "attribute_accuracy": "attributes",
    "direction_accuracy": "direction",
    "speed_accuracy": "speed",
    "shape_accuracy": "shape",
    "identity_consistency": "identity",
}


def main(argv: list[str] | None = None) -> None:
    import torch
    from sceneworld.host import ensure_comfy

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("weights", nargs="?", default=str(HERE / "weights" / "world_video.safetensors"))
    parser.add_argument("--shift", type=float, default=None, help="ModelSamplingSD3's shift (default: 8)")
    parser.add_argument("--videos", type=int, default=32)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    ensure_comfy()
    import comfy.sd
    from diagnose_world_image import roundtrip_exact, sampling_checks, sigma_checks
    from sceneworld import conditioning, metrics, vae, world

    patcher = comfy.sd.load_diffusion_model(args.weights)
    if args.shift is not None:
        import comfy_extras.nodes_model_advanced as advanced

        patcher = advanced.ModelSamplingSD3().patch(patcher, args.shift)[0]
    base = patcher.model
    videos = world.videos(args.videos, 7)
    clips = world.video_batch(videos)
    z = vae.video_to_latent(clips)
    latent = vae.encode_video_latent(clips)
    context = conditioning.embed_videos(videos)
    exact = roundtrip_exact(base, clips, z, latent, vae.decode_video_latent)
    print(f"latent RMS {z.pow(2).mean().sqrt():.3f}, std {z.std():.3f}; VAE + process_in/out exact: {exact}")
    # the content variance: about the per-channel means (the black background is most of the raw moment)
    variance = (z - z.mean(dim=(0, 2, 3, 4), keepdim=True)).pow(2).mean().item()

    def shown(score: dict) -> str:
        return ", ".join(f"{name} {score[k]:.2f}" for k, name in KEYS.items())

    levels = (0.1, 0.3, 0.5, 0.7, 0.85, 0.95, 1.0)
    with torch.no_grad():
        for sigma, cond, error, null_error, effect in sigma_checks(
            base, z, context, levels, lambda x0, s, n: (1 - s) * x0 + s * n, variance
        ):
            score = metrics.score_videos(vae.latent_to_video(cond).clamp(0, 1), videos)
            print(
                f"σ {sigma:4.2f}: x0 MSE / data variance {error:.3f} (null prompt {null_error:.3f}, "
                f"prompt effect {effect:.2g}); "
                f"one-step {shown(score)}"
            )
        for label, out in sampling_checks(patcher, latent, context, "simple"):
            print(f"{label}: {shown(metrics.score_videos(vae.decode_video_latent(out), videos))}")


if __name__ == "__main__":
    main()
