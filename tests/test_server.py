"""The pack in a real ComfyUI server, over HTTP and the websocket, as headless users queue prompts."""

from __future__ import annotations

import pytest
from fg_testing.prompts import tiny_txt2img
from fg_testing.server import ComfyServer, prepare_base_dir

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base_dir = prepare_base_dir(tmp_path_factory.mktemp("server"))
    with ComfyServer(base_dir) as running:
        yield running


def test_nodes_appear_in_object_info(server):
    info = server.get("/object_info")
    for name in ("FreeGuidanceCFGInterval", "FreeGuidanceCountEvaluations", "FreeGuidanceEvaluationReport"):
        assert name in info, name
        assert info[name]["category"].startswith("sampling/guidance")
        assert info[name]["description"]
    inputs = info["FreeGuidanceCFGInterval"]["input"]["required"]
    assert inputs["start_percent"][1]["tooltip"] and inputs["end_percent"][1]["tooltip"]
    assert "IMPORT FAILED" not in server.log()


def test_queue_over_http_reports_saved_evaluations(server):
    def patch(g, model):
        return g.node("FreeGuidanceCFGInterval", model=model, start_percent=0.0, end_percent=0.5)

    prompt, ids = tiny_txt2img("sd15", steps=6, patch=patch)
    entry = server.queue(prompt)
    assert entry["status"]["status_str"] == "success"
    stats = entry["outputs"][ids["stats"]]["latent_stats"][0]
    assert stats["finite"] and stats["shape"] == [1, 4, 8, 8]
    counts = entry["outputs"][ids["report"]]["free_guidance_evaluations"][0]
    assert counts["cond"] == 6 and 0 < counts["uncond"] < 6


def test_bad_input_is_rejected_at_queue_time_with_the_node_and_input_named(server):
    def patch(g, model):
        return g.node("FreeGuidanceCFGInterval", model=model, start_percent=0.9, end_percent=0.1)

    prompt, _ = tiny_txt2img("sd15", patch=patch)
    status, answer = server.post("/prompt", {"prompt": prompt})
    assert status == 400
    text = str(answer["node_errors"])
    assert "CFG Interval" in text and "start_percent" in text
