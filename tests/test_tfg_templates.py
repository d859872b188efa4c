"""The TFG templates (issue #17) headless through the real server and the CLI, with tiny models: inpainting and
2x super-resolution with a plain SD1.5 checkpoint, style through CLIP vision. test_workflows.py also loads
them in the editor; this file checks what is TFG's own: the backward counts and the sampler's telemetry."""

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
# template → (pack nodes it must wire, the backward passes its preset makes)
EXPECTED = {
    "sd15_inpaint_tfg_mpgd": (
        {"FreeGuidanceObjectiveImageMeasurement", "FreeGuidanceTFGSampler"},
        {"objective"},
    ),
    "sd15_superres_tfg_2x": (
        {"FreeGuidanceObjectiveImageMeasurement", "FreeGuidanceTFGSampler"},
        {"objective"},
    ),
    "sd15_style_tfg_clipvision": (
        {"FreeGuidanceObjectiveClipVision", "FreeGuidanceTFGSampler", "CLIPVisionLoader"},
        {"model", "objective"},
    ),
}


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fgcli", *args], cwd=ROOT, capture_output=True, text=True, timeout=900
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base_dir = template_models.prepare_base_dir(tmp_path_factory.mktemp("tfg-templates-server"))
    with ComfyServer(base_dir, extra_args=("--fp32-text-enc",)) as running:
        yield running


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_template_runs_and_reports_backward_passes_and_objective(name, server, tmp_path):
    path = ROOT / "workflows" / f"{name}.json"
    nodes, backward = EXPECTED[name]
    workflow = json.loads(path.read_text())
    types = {n["type"] for n in workflow["nodes"]}
    assert nodes <= types, nodes - types
    converted = cli("convert", str(path), "--server", server.url)
    assert converted.returncode == 0, converted.stderr
    prompt, _ = template_models.substitute(json.loads(converted.stdout))
    target = tmp_path / "prompt.json"
    target.write_text(json.dumps(prompt))
    args = ["queue", str(target), "--server", server.url, "--out", str(tmp_path / "out"), "--json", "--quiet"]
    for item in template_models.shrink_overrides(prompt):
        args += ["--set", item]
    result = cli(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["status"] == "success" and summary["files"]
    counts = summary["evaluations"][0]
    assert set(counts["backward"]) == backward and counts["backward"]["objective"] > 0
    (record,) = [r for r in summary["telemetry"] if r["title"] == "TFG Guided Sampler"]
    assert len(record["steps"]) == 3  # shrunk to 3 steps
    assert all(step["objective"] is not None for step in record["steps"])
