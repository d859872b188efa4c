"""The digits reference model: its shipped weights in ComfyUI's loader, its linear VAE and conditioning, a
fixed-seed quality smoke test through real prompts, and a few steps of its training script."""

from __future__ import annotations

import json

import pytest
import torch
from fg_testing import reference
from fg_testing.reference import Technique

# Measured on the shipped weights with exactly this workflow (seed 0, 10 per digit, 20 euler steps, `simple`):
# CFG 3 → accuracy 1.000 (mean requested-class probability 0.998); cond only → 0.930 (0.889). Chance is 0.10.
# The threshold leaves 10 points of margin for other CPUs' numerics.
SMOKE_CFG = 3.0
SMOKE_CFG_MIN_ACCURACY = 0.90
SMOKE_PER_CLASS = 10


@pytest.fixture(scope="module")
def ref_host(comfy_host):
    """The host with the reference nodes and weights; one torch thread (a 2-thread pool stalls on a busy CPU)."""
    reference.load_in_process(comfy_host)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield comfy_host
    torch.set_num_threads(threads)


def shipped_state_dict():
    import safetensors.torch

    return safetensors.torch.load_file(str(reference.WEIGHTS_DIR / reference.MODEL_FILE))


def test_shipped_weights_load_through_comfyui_as_sd3(comfy_host):
    import comfy.model_base
    import comfy.model_detection
    import comfy.sd
    import comfy.supported_models
    from digitref import model

    sd = shipped_state_dict()
    assert model.count_parameters(sd) < 3_000_000
    assert comfy.model_detection.detect_unet_config(sd, "") == model.UNET_CONFIG
    patcher = comfy.sd.load_diffusion_model_state_dict(sd)
    assert isinstance(patcher.model, comfy.model_base.SD3)
    assert type(patcher.model.model_config) is comfy.supported_models.SD3
    assert patcher.model.model_sampling.shift == pytest.approx(3.0)
    loaded = patcher.model.diffusion_model.state_dict()
    for key, value in sd.items():
        assert torch.equal(loaded[key].float(), value.float()), key


def test_linear_vae_is_exactly_invertible_and_matches_sd3_latent_format(comfy_host):
    import comfy.latent_formats
    from digitref import data

    images, _ = data.real_images32()
    latents = data.image_to_latent(images[:64])
    assert latents.shape == (64, 16, 8, 8)
    assert torch.allclose(data.latent_to_image(latents), images[:64], atol=1e-5)
    fmt = comfy.latent_formats.SD3()
    assert torch.allclose(fmt.process_in(data.process_out(latents)), latents, atol=1e-5)
    assert torch.allclose(
        data.decode_comfy_latent(data.encode_comfy_latent(images[:8])), images[:8], atol=1e-5
    )


def test_class_conditioning_is_fixed_and_null_is_zero_out(ref_host, run_prompt):
    from digitref import conditioning

    a, b = conditioning.class_embedding([3, 3, 5, -1])
    again, _ = conditioning.class_embedding([3])
    assert torch.equal(a[0], again[0]) and torch.equal(a[0], a[1]) and not torch.equal(a[0], a[2])
    assert a[3].abs().sum() == 0 and b[3].abs().sum() == 0
    import nodes

    (cond,) = nodes.NODE_CLASS_MAPPINGS["DigitsRefClassConditioning"]().encode("3, 5", 2)
    assert torch.equal(cond[0][0], conditioning.class_embedding([3, 3, 5, 5])[0])
    (null,) = nodes.NODE_CLASS_MAPPINGS["ConditioningZeroOut"]().zero_out(cond)
    context, pooled = conditioning.class_embedding([-1] * 4)
    assert torch.equal(null[0][0], context) and torch.equal(null[0][1]["pooled_output"], pooled)


def _run(technique: Technique, per_class: int = SMOKE_PER_CLASS, steps: int = 20):
    from fg_testing import host

    prompt, ids = reference.workflow(technique, repeat=per_class, steps=steps, seed=0, save_latent="smoke")
    result = host.run_prompt(prompt)
    latent = reference.read_saved_latent(host.init_host().base_dir, result.outputs, ids["latent"])
    return latent, result.outputs[ids["report"]]["free_guidance_evaluations"][0]


def _scores(latent, per_class: int) -> tuple[float, float]:
    """(accuracy, mean probability of the requested class) by the independent classifier."""
    from digitref import data

    labels = torch.arange(10).repeat_interleave(per_class)
    with torch.no_grad():
        probs = reference.load_classifier()(data.decode_comfy_latent(latent)).softmax(1)
    accuracy = float((probs.argmax(1) == labels).float().mean())
    return accuracy, float(probs[torch.arange(len(labels)), labels].mean())


def test_cfg_generates_requested_digits_and_beats_cond_only(ref_host):
    """Fixed seed, through UNETLoader, the reference nodes, KSampler and SaveLatent in the real host."""
    cfg_latent, cfg_counts = _run(Technique("CFG", "CFG", SMOKE_CFG))
    cond_latent, cond_counts = _run(Technique("cond only", "cond only", 1.0))
    assert (cfg_counts["cond"], cfg_counts["uncond"]) == (20, 20)
    assert (cond_counts["cond"], cond_counts["uncond"]) == (20, 0)  # cfg 1: ComfyUI skips the uncond pass
    cfg_accuracy, cfg_prob = _scores(cfg_latent, SMOKE_PER_CLASS)
    cond_accuracy, cond_prob = _scores(cond_latent, SMOKE_PER_CLASS)
    assert cfg_accuracy >= SMOKE_CFG_MIN_ACCURACY, (cfg_accuracy, cond_accuracy)
    assert cond_accuracy < cfg_accuracy and cond_prob < cfg_prob, (
        cfg_accuracy,
        cond_accuracy,
        cfg_prob,
        cond_prob,
    )


def test_shipped_classifier_reaches_its_held_out_accuracy(comfy_host):
    from digitref import data

    images8, labels = data.load_digits()
    _, test_index = data.split(labels, seed=0)
    with torch.no_grad():
        predicted = reference.load_classifier()(data.upsample(images8[test_index])).argmax(1)
    accuracy = float((predicted == labels[test_index]).float().mean())
    recorded = json.loads((reference.WEIGHTS_DIR / "classifier.json").read_text())["test_accuracy"]
    assert accuracy >= 0.95 and accuracy == pytest.approx(recorded, abs=1e-6)


def test_training_script_runs_and_writes_a_loadable_sd3_state_dict(comfy_host, tmp_path):
    import importlib.util

    import comfy.model_base
    import comfy.sd
    import safetensors.torch

    spec = importlib.util.spec_from_file_location(
        "digits_reference_train", reference.REFERENCE_DIR / "train.py"
    )
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    args = ["--steps", "3", "--batch", "8", "--log-every", "1"]
    threads = torch.get_num_threads()  # train.py sets one thread; give the rest of the session its own back
    try:
        record = train.main([*args, "--out", str(tmp_path / "a")])
        train.main([*args, "--out", str(tmp_path / "b")])
    finally:
        torch.set_num_threads(threads)
    assert [step for step, _ in record["losses"]] == [1, 2, 3]
    assert all(loss == loss and 0 < loss < 10 for _, loss in record["losses"])
    sd = safetensors.torch.load_file(str(tmp_path / "a" / train.WEIGHTS_NAME))
    assert sd.keys() == shipped_state_dict().keys()
    # Seeded: the second run gave the same weights, bit for bit.
    again = safetensors.torch.load_file(str(tmp_path / "b" / train.WEIGHTS_NAME))
    assert all(torch.equal(sd[k], again[k]) for k in sd)
    patcher = comfy.sd.load_diffusion_model_state_dict(sd)
    assert isinstance(patcher.model, comfy.model_base.SD3)
