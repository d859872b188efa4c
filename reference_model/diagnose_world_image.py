"""Check the world image model's sampling path against the ground truth (WORLD.md, "diagnosis").

    nice python reference_model/diagnose_world_image.py [weights.safetensors]

1. Rendered scenes → linear VAE → SD1.5 ``process_out``/``process_in`` → decode: exact.
2. Per noise level σ: the model's denoised latent (ComfyUI's ``apply_model``, conditional and null prompt)
   against the true latent, as a fraction of the data variance, and the prompt accuracy of one-step denoising.
3. ComfyUI's sampler (``euler``/``normal``, 10 steps) from pure noise at CFG 1 and 3, and from the noised
   ground truth at steps 3, 5, 7 of 10: if those recover the scene and sampling from noise does not, the
   conventions are right and the model is what fails.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def roundtrip_exact(base, pixels, z, latent, decode) -> bool:
    """The LATENT decodes to the pixels and the family's ``process_in`` gives the model-space latent back."""
    import torch

    return torch.allclose(decode(latent), pixels, atol=1e-5) and torch.allclose(
        base.process_latent_in(latent), z, atol=1e-5
    )


def sigma_checks(base, z, context, levels, noised, variance: float):
    """Per noise level: (σ, conditional x0, its MSE / variance, the null prompt's MSE / variance, the prompt's
    effect |x0(cond) − x0(null)|² / variance: near 0 when the model has learned to ignore the prompt)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    for sigma in levels:
        x_t = noised(z, sigma, torch.randn(z.shape, generator=generator))
        sigmas = torch.full((z.shape[0],), sigma)
        cond = base.apply_model(x_t, sigmas, c_crossattn=context)
        null = base.apply_model(x_t, sigmas, c_crossattn=torch.zeros_like(context))
        errors = [(x - z).pow(2).mean().item() / variance for x in (cond, null)]
        yield sigma, cond, *errors, (cond - null).pow(2).mean().item() / variance


def sampling_checks(patcher, latent, context, scheduler: str):
    """ComfyUI's ``euler`` sampler, 10 steps, from pure noise at CFG 1 and 3 and from the noised ground
    truth at steps 3, 5, 7 (CFG 3): (label, sampled LATENT)."""
    import comfy.sample
    import torch

    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(1))
    positive = [[context, {}]]
    negative = [[torch.zeros_like(context), {}]]
    runs = [("noise", 1.0, 0, torch.zeros_like(latent)), ("noise", 3.0, 0, torch.zeros_like(latent))]
    runs += [("truth", 3.0, start, latent) for start in (3, 5, 7)]
    for source, cfg, start, start_latent in runs:
        out = comfy.sample.sample(
            patcher, noise, 10, cfg, "euler", scheduler, positive, negative, start_latent,
            seed=1, start_step=start, last_step=10, force_full_denoise=True,
        )  # fmt: skip
        yield f"from {source} at step {start}/10, cfg {cfg:g}", out


def main(argv: list[str] | None = None) -> None:
    import torch
    from sceneworld.host import ensure_comfy

    torch.set_num_threads(1)
    ensure_comfy()
    from sceneworld import conditioning, metrics, vae, world

    args = sys.argv[1:] if argv is None else argv
    path = args[0] if args else str(HERE / "weights" / "world_image.safetensors")
    spec = importlib.util.spec_from_file_location("world_nodes", HERE / "world_nodes" / "__init__.py")
    nodes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nodes)
    patcher = nodes.load_image_model(path)
    base = patcher.model
    scenes = world.scenes(32, 7)
    images = world.scene_batch(scenes)
    z = vae.image_to_latent(images)
    latent = vae.encode_image_latent(images)
    context = conditioning.embed_scenes(scenes)
    exact = roundtrip_exact(base, images, z, latent, vae.decode_image_latent)
    print(f"{base.model_type}; latent RMS {z.pow(2).mean().sqrt():.3f}; VAE + process_in/out exact: {exact}")
    variance = z.var().item()
    levels = (0.1, 0.3, 1.0, 2.0, 4.0, 8.0, 14.6)
    with torch.no_grad():
        for sigma, cond, error, null_error, effect in sigma_checks(
            base, z, context, levels, lambda x0, s, n: x0 + s * n, variance
        ):
            score = metrics.score_images(vae.latent_to_image(cond).clamp(0, 1), scenes)
            print(
                f"σ {sigma:5.1f}: x0 MSE / data variance {error:.3f} (null prompt {null_error:.3f}, "
                f"prompt effect {effect:.2g}); "
                f"one-step prompt accuracy {score['prompt_accuracy']:.2f}"
            )
        for label, out in sampling_checks(patcher, latent, context, "normal"):
            score = metrics.score_images(vae.decode_image_latent(out), scenes)
            print(f"{label}: " + ", ".join(f"{k} {v:.3f}" for k, v in score.items()))


if __name__ == "__main__":
    main()
