"""The pack inside the real pinned ComfyUI: loading, schema, tiny models of every family, loaders."""

from __future__ import annotations

import pytest
import torch
from fg_testing import tiny_models, tiny_vae_clip
from fg_testing.prompts import Graph

PACK_NODES = {"FreeGuidanceCFGInterval", "FreeGuidanceCountEvaluations", "FreeGuidanceEvaluationReport"}


def test_pack_loads_with_no_import_errors(comfy_host):
    assert comfy_host.failed_builtin_imports == []
    registered = set(comfy_host.nodes.NODE_CLASS_MAPPINGS)
    assert PACK_NODES <= registered
    assert PACK_NODES <= set(comfy_host.pack.NODE_CLASS_MAPPINGS)


def test_every_node_documents_itself(comfy_host):
    for name, cls in comfy_host.pack.NODE_CLASS_MAPPINGS.items():
        assert cls.CATEGORY.startswith("sampling/guidance"), name
        assert len(getattr(cls, "DESCRIPTION", "")) > 40, name
        assert name in comfy_host.pack.NODE_DISPLAY_NAME_MAPPINGS, name
        for section_name, section in cls.INPUT_TYPES().items():
            if section_name == "hidden":  # UNIQUE_ID and friends: filled by ComfyUI, never shown
                continue
            for input_name, spec in section.items():
                options = spec[1] if len(spec) > 1 else {}
                assert options.get("tooltip"), f"{name}.{input_name} has no tooltip"


def test_pack_imports_are_relative_only(comfy_host):
    """The pack's own folders are never imported as top-level modules (ComfyUI owns `nodes` and `utils`, PyPI
    has a `guidance`). ComfyUI's `server` module is how a node reaches PromptServer, so that one is allowed."""
    import ast
    from pathlib import Path

    forbidden = {"nodes", "guidance", "utils"}
    pack_dir = Path(comfy_host.pack.__path__[0])
    checked = 0
    for file in pack_dir.rglob("*.py"):
        if {"tests", "bench", "scripts"} & set(file.relative_to(pack_dir).parts):
            continue
        checked += 1
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert node.module.split(".")[0] not in forbidden, f"{file}: from {node.module} import ..."
            if isinstance(node, ast.Import):
                for alias in node.names:
                    assert alias.name.split(".")[0] not in forbidden, f"{file}: import {alias.name}"
    assert checked > 10


def test_guidance_modules_never_import_comfyui(comfy_host):
    from pathlib import Path

    for file in (Path(comfy_host.pack.__path__[0]) / "guidance").rglob("*.py"):
        text = file.read_text()
        assert "import comfy" not in text and "from comfy" not in text, file


@pytest.mark.parametrize("family", tiny_models.ALL_FAMILIES)
def test_tiny_model_is_detected_as_its_family(comfy_host, family):
    import comfy.model_detection

    sd = tiny_models.state_dict(family)
    detected = comfy.model_detection.detect_unet_config(sd, "")
    spec = tiny_models.FAMILIES[family]
    expected_class = {
        "sd15": "BaseModel",
        "sd15_inpaint": "BaseModel",
        "sdxl": "SDXL",
        "sd3": "SD3",
        "flux": "Flux",
        "wan21": "WAN21",
        "ltxv": "LTXV",
        "hunyuan_video": "HunyuanVideo",
    }[family]
    model = tiny_models.build_model(family)
    assert type(model.model).__name__ == expected_class
    if spec.detected:
        assert detected == spec.config
    else:
        # ComfyUI's Flux detection hard-codes the full width, which is why the tiny Flux is built directly.
        assert detected["hidden_size"] == 3072 and spec.config["hidden_size"] == 64
    if family == "sd15_inpaint":
        assert model.model.model_config.inpaint_model() and model.model.concat_keys


@pytest.mark.parametrize("family", tiny_models.ALL_FAMILIES)
def test_plain_ksampler_runs_on_every_family(run_prompt, family):
    from fg_testing.prompts import tiny_txt2img

    prompt, ids = tiny_txt2img(family, batch=2, steps=2)
    result = run_prompt(prompt)
    stats = result.outputs[ids["stats"]]["latent_stats"][0]
    assert stats["finite"]
    assert stats["shape"] == list(tiny_models.latent_shape(family, 2, 8, 8, 3))
    counts = result.outputs[ids["report"]]["free_guidance_evaluations"][0]
    assert counts["cond"] == 2 and counts["uncond"] == 2


def test_files_load_through_comfyui_loader_nodes(comfy_host, run_prompt):
    """UNETLoader, VAELoader and CLIPLoader on files in the host's model folders, through to a saved image."""
    unet = tiny_models.save_model_file("sd15", comfy_host.models_dir("diffusion_models"))
    vae = tiny_vae_clip.save(
        tiny_vae_clip.taesd_state_dict(4), comfy_host.models_dir("vae") / "tiny_taesd.safetensors"
    )
    clip = tiny_vae_clip.save(
        tiny_vae_clip.clip_l_state_dict(), comfy_host.models_dir("text_encoders") / "tiny_clip_l.safetensors"
    )
    g = Graph()
    model = g.node("UNETLoader", unet_name=unet, weight_dtype="default")
    model = g.node("FreeGuidanceCFGInterval", model=model, start_percent=0.2, end_percent=0.8)
    clip_node = g.node("CLIPLoader", clip_name=clip, type="stable_diffusion", device="default")
    positive = g.node("CLIPTextEncode", clip=clip_node, text="a red fox in the snow")
    negative = g.node("CLIPTextEncode", clip=clip_node, text="blurry")
    latent = g.node("EmptyLatentImage", width=64, height=64, batch_size=1)
    sampled = g.node(
        "KSampler",
        model=model,
        seed=3,
        steps=3,
        cfg=5.0,
        sampler_name="euler",
        scheduler="normal",
        positive=positive,
        negative=negative,
        latent_image=latent,
        denoise=1.0,
    )
    vae_node = g.node("VAELoader", vae_name=vae)
    image = g.node("VAEDecode", samples=sampled, vae=vae_node)
    save = g.node("SaveImage", images=image, filename_prefix="free_guidance_test")
    result = run_prompt(g.prompt)
    images = result.outputs[Graph.id(save)]["images"]
    assert len(images) == 1 and images[0]["filename"].endswith(".png")


def test_vae_round_trip_shapes(comfy_host):
    import comfy.sd

    for channels in (4, 16):
        vae = comfy.sd.VAE(sd=dict(tiny_vae_clip.taesd_state_dict(channels)))
        image = vae.decode(torch.randn(1, channels, 8, 8))
        assert image.shape == (1, 64, 64, 3)
        assert vae.encode(image).shape == (1, channels, 8, 8)


def test_a_missing_host_fails_loudly_with_instructions(tmp_path, monkeypatch):
    from fg_testing import host

    monkeypatch.setenv("FREE_GUIDANCE_COMFYUI", str(tmp_path))
    with pytest.raises(host.HostMissing, match="COMFYUI_SOURCE"):
        host.comfyui_dir()


def test_setup_script_reports_a_missing_source(tmp_path):
    """Without internet or a local source the setup fails with a message that says how to provide one."""
    import subprocess

    from fg_testing.host import PACK_DIR

    result = subprocess.run(
        [
            "bash",
            str(PACK_DIR / "scripts" / "setup_host.sh"),
            "--source",
            str(tmp_path / "nowhere"),
            "--cache",
            str(tmp_path / "cache"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "COMFYUI_SOURCE" in result.stderr
