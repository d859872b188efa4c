"""The negative-prompt template (workflows/flux_schnell_nasa.json): a negative prompt working on a cfg-1 model.

It wires NASA with a negative prompt into Flux schnell at cfg 1, explains it in a note, and run headless through
the real server (tiny models under the official file names, as tests/test_workflows.py does) it evaluates one
conditional pass per step with NASA changing the attention at every step, and its output differs from the same
workflow with alpha 0 (which is plain cfg-1 sampling, where the negative prompt does nothing).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from fg_testing import template_models
from fg_testing.server import ComfyServer

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "workflows" / "flux_schnell_nasa.json"


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fgcli", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base_dir = template_models.prepare_base_dir(tmp_path_factory.mktemp("negative-templates"))
    with ComfyServer(base_dir, extra_args=("--fp32-text-enc",)) as running:
        yield running


def test_the_template_wires_a_negative_prompt_into_nasa_at_cfg_1():
    workflow = json.loads(TEMPLATE.read_text())
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {
        link[0]: link for link in workflow["links"]
    }  # [id, from node, from slot, to node, to slot, type]
    (nasa,) = [n for n in nodes.values() if n["type"] == "FreeGuidanceNASA"]
    (negative,) = [i for i in nasa["inputs"] if i["name"] == "negative"]
    source = nodes[links[negative["link"]][1]]
    assert source["type"] == "CLIPTextEncode" and source["widgets_values"][0].strip()
    (sampler,) = [n for n in nodes.values() if n["type"] == "KSampler"]
    seed, _, steps, cfg = sampler["widgets_values"][:4]
    assert cfg == 1.0 and steps <= 4
    notes = " ".join(n["widgets_values"][0] for n in nodes.values() if n["type"] in ("Note", "MarkdownNote"))
    assert "**NASA / NAG Negative Attention**" in notes and "cfg 1" in notes


def queue(server, tmp_path, overrides=()):
    converted = cli("convert", str(TEMPLATE), "--server", server.url)
    assert converted.returncode == 0, converted.stderr
    prompt, substituted = template_models.substitute(json.loads(converted.stdout))
    assert substituted  # the Flux model and T5 become their tiny stand-ins
    tmp_path.mkdir(parents=True, exist_ok=True)
    target = tmp_path / "prompt.json"
    target.write_text(json.dumps(prompt))
    (nasa_id,) = [k for k, n in prompt.items() if n["class_type"] == "FreeGuidanceNASA"]
    args = ["queue", str(target), "--server", server.url, "--out", str(tmp_path / "out"), "--json", "--quiet"]
    for item in [*template_models.shrink_overrides(prompt), *[f"{nasa_id}.{o}" for o in overrides]]:
        args += ["--set", item]
    result = cli(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["status"] == "success" and summary["files"]
    return summary


def test_runs_headless_one_pass_per_step_and_the_negative_changes_the_image(server, tmp_path):
    guided = queue(server, tmp_path / "guided")
    counts = guided["evaluations"][0]
    assert counts["uncond"] == 0 and counts["cond"] == counts["total"] > 0  # cfg 1: one pass per step
    (record,) = [r for r in guided["telemetry"] if r["title"] == "NASA Negative Attention"]
    assert record["steps"] and all(step["nasa_layers"] > 0 for step in record["steps"])
    plain = queue(server, tmp_path / "plain", overrides=("alpha=0.0",))
    assert plain["evaluations"][0] == counts
    images = [Path(f).read_bytes() for f in guided["files"] if f.endswith(".png")]
    plain_images = [Path(f).read_bytes() for f in plain["files"] if f.endswith(".png")]
    assert images and images != plain_images
