"""Output hashes of every pack node at its defaults on tiny SD1.5, SD3, Flux and Wan 2.1 at fixed seeds.

Each case builds the node with the defaults its ``INPUT_TYPES`` declares (widgets of ``required`` and
``optional``; size inputs of the resolution nodes are shrunk to fit the tiny models, named in ``OVERRIDES``),
puts it behind Count Network Evaluations, samples through ComfyUI's own ``comfy.sample`` (KSampler for MODEL
nodes, SamplerCustom for SAMPLER nodes) and records the sha256 of the output latent and the evaluation counts.
A node that refuses a family records the error class and message instead.

``tests/bit_identity_hashes.json`` holds the hashes recorded on main before the host-layer refactor;
``tests/test_bit_identity.py`` checks them. A sha256 holds only on CPUs whose float kernels round as the
recording machine's did (another CPU kind changes the last bits: 1e-6 of the latent's range), so
``tests/bit_identity_latents.safetensors`` also keeps each output latent; where the hash differs the test
checks the latent against it within ``TOLERANCE``. Record again with ``cd tests && python -m
fg_testing.bit_identity`` (hashes and latents) or ``--latents`` (the latents only).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

FAMILIES = ("sd15", "sd3", "flux", "wan21")
STEPS = 3
CFG = 4.0
SEED = 0
HASHES_FILE = Path(__file__).resolve().parents[1] / "bit_identity_hashes.json"
LATENTS_FILE = HASHES_FILE.with_name("bit_identity_latents.safetensors")
# Largest difference from the recorded latent, as a fraction of its largest magnitude, accepted where the hash
# differs: two CPU kernel sets differ by 2e-7 to 2e-6 here (AVX2, AVX-512, none); a changed technique moves
# the latent by far more.
TOLERANCE = 1e-4
# The guidance nodes of accbbaf, where the hashes were recorded (diagnostics change no output; nodes added
# since have no earlier output to match).
RECORDED_NODES = frozenset(
    {
        "FreeGuidanceAdaptiveGuidance",
        "FreeGuidanceCFGInterval",
        "FreeGuidanceCFGSchedule",
        "FreeGuidanceCFGppEuler",
        "FreeGuidanceCFGppSampler",
        "FreeGuidanceDiffuseHigh",
        "FreeGuidanceFouriScale",
        "FreeGuidanceICG",
        "FreeGuidanceLinearAG",
        "FreeGuidancePAG",
        "FreeGuidancePCGSampler",
        "FreeGuidanceSAG",
        "FreeGuidanceSEG",
        "FreeGuidanceSTG",
        "FreeGuidanceTSG",
    }
)
# Inputs whose defaults (2048 px, 1024 px) are far beyond the tiny models' 8x8 latents.
OVERRIDES = {
    "FreeGuidanceDiffuseHigh": {"width": 128, "height": 128},
    "FreeGuidanceFouriScale": {"width": 128, "height": 128, "base_resolution": 64},
}
# Latent size (height, width) per node; 8x8 unless named.
LATENT = {"FreeGuidanceFouriScale": (16, 16)}
# The sampler's cfg per node; CFG unless named (CFG++ takes lambda in [0, 1] as cfg).
SAMPLE_CFG = {"FreeGuidanceCFGppEuler": 0.8, "FreeGuidanceCFGppSampler": 0.8}
# Families beyond FAMILIES per node (FouriScale's layer list needs the SD1.x block layout).
EXTRA_FAMILIES = {"FreeGuidanceFouriScale": ("sd15_deep",)}


def widget_defaults(cls) -> dict:
    """The defaults of every widget input (required and optional) of a V1 node class."""
    values = {}
    types = cls.INPUT_TYPES()
    for section in ("required", "optional"):
        for name, spec in types.get(section, {}).items():
            kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
            if isinstance(kind, (list, tuple)):
                values[name] = options.get("default", kind[0])
            elif kind in ("INT", "FLOAT", "BOOLEAN", "STRING") and "default" in options:
                values[name] = options["default"]
    return values


def link_inputs(cls) -> dict:
    types = cls.INPUT_TYPES()
    return {
        name: spec[0]
        for section in ("required", "optional")
        for name, spec in types.get(section, {}).items()
        if isinstance(spec[0], str) and spec[0] not in ("INT", "FLOAT", "BOOLEAN", "STRING")
    }


def cases(pack) -> list[tuple[str, str]]:
    """Every (node id, family) recorded: each guidance node of accbbaf on each family."""
    return [
        (node_id, family)
        for node_id in sorted(pack.NODE_CLASS_MAPPINGS)
        if node_id in RECORDED_NODES
        for family in FAMILIES + EXTRA_FAMILIES.get(node_id, ())
    ]


@functools.cache
def _clip():
    import comfy.sd

    from . import tiny_vae_clip

    return comfy.sd.load_text_encoder_state_dicts(
        state_dicts=[tiny_vae_clip.clip_l_state_dict()], clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION
    )


@functools.cache
def _vae():
    import comfy.sd

    from . import tiny_vae_clip

    return comfy.sd.VAE(sd=dict(tiny_vae_clip.taesd_state_dict(4)))


@functools.cache
def _model(family: str):
    """This module's own tiny model per family, built from a fixed global seed (independent of test order)."""
    from . import tiny_models

    with torch.random.fork_rng():
        torch.manual_seed(0)
        return tiny_models.build_model(family)


def run_case(pack, node_id: str, family: str) -> tuple[dict, torch.Tensor | None]:
    """Hash and counts of one node on one family (or the error it raises), and the output latent (None where
    the node refused), from a fixed global seed, on one CPU thread (a multi-threaded reduction may round
    differently)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return _run_case(pack, node_id, family)
    finally:
        torch.set_num_threads(threads)


def latent_matches(samples: torch.Tensor, recorded: torch.Tensor) -> tuple[bool, float]:
    """Whether ``samples`` is the recorded latent within ``TOLERANCE``, and the relative difference."""
    if samples.shape != recorded.shape or samples.dtype != recorded.dtype:
        return False, float("inf")
    scale = float(recorded.abs().max())
    difference = float((samples - recorded).abs().max()) / max(scale, 1e-12)
    return difference <= TOLERANCE, difference


def _run_case(pack, node_id: str, family: str) -> tuple[dict, torch.Tensor | None]:
    from . import sampling
    from .test_nodes import latent_digest

    cls = pack.NODE_CLASS_MAPPINGS[node_id]
    counted = _model(family).clone()
    counter = pack.NODE_CLASS_MAPPINGS["FreeGuidanceCountEvaluations"]().patch(counted)[0]
    inputs = {**widget_defaults(cls), **OVERRIDES.get(node_id, {})}
    links = link_inputs(cls)
    if "model" in links:
        inputs["model"] = counter
    if "vae" in links:
        inputs["vae"] = _vae()
    if "clip" in links:
        inputs["clip"] = _clip()
    if "unique_id" in cls.INPUT_TYPES().get("hidden", {}):
        inputs["unique_id"] = "1"
    height, width = LATENT.get(node_id, (8, 8))
    try:
        out = getattr(cls(), cls.FUNCTION)(**inputs)[0]
        if cls.RETURN_TYPES[0] == "SAMPLER":
            sigmas = sampling.sigmas_for(counter, STEPS)
            samples = sampling.custom_sample(
                counter,
                family,
                out,
                sigmas,
                cfg=SAMPLE_CFG.get(node_id, CFG),
                seed=SEED,
                height=height,
                width=width,
            )
        else:
            samples = sampling.ksample(
                out,
                family,
                steps=STEPS,
                cfg=SAMPLE_CFG.get(node_id, CFG),
                seed=SEED,
                height=height,
                width=width,
            )
    except Exception as error:  # a refused family is part of the record
        return {"error": f"{type(error).__name__}: {error}"}, None
    report = pack.NODE_CLASS_MAPPINGS["FreeGuidanceEvaluationReport"]().report(counter, {"samples": samples})
    counts = report["ui"]["free_guidance_evaluations"][0]
    return {"sha256": latent_digest(samples), "counts": counts}, samples.detach().cpu().contiguous()


def compute_all(pack) -> tuple[dict, dict]:
    records, latents = {}, {}
    for node_id, family in cases(pack):
        case = f"{node_id}/{family}"
        records[case], samples = run_case(pack, node_id, family)
        if samples is not None:
            latents[case] = samples
    return records, latents


def main() -> None:
    import argparse
    import platform

    import safetensors.torch

    from . import host

    parser = argparse.ArgumentParser(description="Record the bit-identity hashes and latents.")
    parser.add_argument("--latents", action="store_true", help="write the latents only, keep the hashes")
    args = parser.parse_args()
    pack = host.init_host().pack
    records, latents = compute_all(pack)
    if not args.latents:
        HASHES_FILE.write_text(json.dumps(records, indent=1, sort_keys=True) + "\n")
        print(f"wrote {len(records)} cases to {HASHES_FILE}")
    metadata = {"torch": torch.__version__, "cpu": platform.processor() or platform.machine()}
    metadata["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    safetensors.torch.save_file(latents, str(LATENTS_FILE), metadata=metadata)
    print(f"wrote {len(latents)} latents to {LATENTS_FILE}")


if __name__ == "__main__":
    main()
