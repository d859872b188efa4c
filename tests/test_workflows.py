"""The templates in workflows/: they load in the real editor, the CLI's converter matches the editor's own
conversion, and each runs end to end headless through the real server via the CLI, with tiny models under the
official file names. Parametrized over the folder: a new template is tested by dropping its JSON file there.

One server (real main.py on loopback) and one headless Chromium serve the whole module.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fg_testing import browser, frontends, template_models
from fg_testing.browser import Editor
from fg_testing.server import ComfyServer

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = sorted((ROOT / "workflows").glob("*.json"))
FIXTURES = sorted((Path(__file__).parent / "workflow_fixtures").glob("*.json"))
sys.path.insert(0, str(ROOT))

from fgcli import convert  # noqa: E402
from fgcli.client import ComfyClient  # noqa: E402


def _ids(paths):
    return [p.stem for p in paths]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base_dir = template_models.prepare_base_dir(tmp_path_factory.mktemp("workflows-server"))
    # fp32 text encoders: ComfyUI's CPU default (fp16) makes the random CLIP-L very slow to run
    with ComfyServer(base_dir, extra_args=("--fp32-text-enc",)) as running:
        yield running


@pytest.fixture(scope="module")
def object_info(server):
    return ComfyClient(server.url).object_info()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    path = tmp_path_factory.mktemp("browser-artifacts")
    print(f"\nbrowser screenshots in {path}")
    return path


@pytest.fixture(scope="module")
def newest_server(tmp_path_factory):
    """A second server on the same host serving the newest frontend package (--front-end-root)."""
    frontend = frontends.Frontend(frontends.NEWEST_VERSION)
    base_dir = template_models.prepare_base_dir(tmp_path_factory.mktemp("workflows-server-newest"))
    with ComfyServer(base_dir, extra_args=("--fp32-text-enc", *frontend.server_args())) as running:
        yield running


@pytest.fixture(scope="module", params=frontends.FRONTENDS, ids=lambda f: f.id)
def editor(request, server, artifacts):
    """The editor on each frontend and renderer: 1.27.10 (pinned), the newest with the classic canvas and
    with Nodes 2.0. The renderer setting is written before the page opens (the server reads it per request)."""
    frontend = request.param
    target = request.getfixturevalue("newest_server") if frontend.newest else server
    browser.seed_settings(target.base_dir, frontend.settings())
    with Editor(target.url, artifacts=artifacts / frontend.id, frontend=frontend) as running:
        yield running


def editor_output(editor) -> dict:
    """The editor's graphToPrompt output; the newest adds cnr_id/aux_id/ver (node pack ids) to _meta, which
    the server never reads and the converter leaves out (README)."""
    output = editor.graph_to_prompt()["output"]
    for entry in output.values():
        for key in ("cnr_id", "aux_id", "ver"):
            entry.get("_meta", {}).pop(key, None)
    return output


def untitled_titles_as_the_cli_writes_them(frontend: dict, ours: dict, object_info: dict) -> None:
    """The one _meta difference the README names: an untitled node whose definition has no display name gets
    its class name from the CLI, where the editor shows its own English name."""
    for key, entry in ours.items():
        theirs = frontend.get(key)
        class_type = entry.get("class_type")
        display_name = (object_info.get(class_type) or {}).get("display_name")
        if theirs is None or (display_name and display_name != class_type):
            continue
        if entry.get("_meta", {}).get("title") == class_type and "_meta" in theirs:
            theirs["_meta"]["title"] = class_type


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """The CLI as a user runs it (a separate Python process that never imports ComfyUI)."""
    return subprocess.run(
        [sys.executable, "-m", "fgcli", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


# pipeline → the pack's nodes its template must wire (issue #5: guidance; issue #6: high resolution)
PIPELINES = {
    "sd15_txt2img_ag_pag": {"FreeGuidanceAdaptiveGuidance", "FreeGuidancePAG"},
    "sdxl_txt2img_ag_seg": {"FreeGuidanceAdaptiveGuidance", "FreeGuidanceSEG"},
    "sd3_txt2img_ag_stg": {"FreeGuidanceAdaptiveGuidance", "FreeGuidanceSTG"},
    "flux_dev_txt2img_pag": {"FreeGuidancePAG"},
    "wan21_t2v_cfg_schedule_ag_stg": {
        "FreeGuidanceCFGSchedule",
        "FreeGuidanceAdaptiveGuidance",
        "FreeGuidanceSTG",
    },
    "ltxv_t2v_cfg_schedule_ag_stg": {
        "FreeGuidanceCFGSchedule",
        "FreeGuidanceAdaptiveGuidance",
        "FreeGuidanceSTG",
    },
    "sd15_inpaint_ag": {"FreeGuidanceAdaptiveGuidance", "InpaintModelConditioning"},
    "sd15_txt2img_fouriscale_2x": {"FreeGuidanceFouriScale"},
    "sdxl_txt2img_fouriscale_2x": {"FreeGuidanceFouriScale"},
    "sdxl_diffusehigh_2x": {"FreeGuidanceDiffuseHigh", "SamplerCustom"},
    "sd3_diffusehigh_2x": {"FreeGuidanceDiffuseHigh", "SamplerCustom"},
    "flux_dev_diffusehigh_2x": {"FreeGuidanceDiffuseHigh", "SamplerCustom"},
}


COUNTERS = {"FreeGuidanceCountEvaluations", "FreeGuidanceEvaluationReport"}


def test_there_are_templates_for_every_pipeline(object_info):
    names = {p.stem for p in TEMPLATES}
    assert set(PIPELINES) <= names, set(PIPELINES) - names
    for path in TEMPLATES:
        workflow = json.loads(path.read_text())
        types = {n["type"] for n in workflow["nodes"]}
        assert types & {"Note", "MarkdownNote"}, f"{path.name}: no note explaining the knobs"
        assert "FreeGuidanceCountEvaluations" in types and "FreeGuidanceEvaluationReport" in types, path.name
        assert PIPELINES.get(path.stem, set()) <= types, (path.name, PIPELINES[path.stem] - types)
        # the core stand-ins of the first templates are gone: the pack's own nodes do their job
        assert not types & {"PerturbedAttentionGuidance", "SkipLayerGuidanceSD3", "SkipLayerGuidanceDiT"}, (
            path.name
        )
        notes = " ".join(
            n["widgets_values"][0] for n in workflow["nodes"] if n["type"] in ("Note", "MarkdownNote")
        )
        for node_type in types:
            if node_type.startswith("FreeGuidance") and node_type not in COUNTERS:
                title = object_info[node_type]["display_name"].removesuffix(" (Free Guidance)")
                assert f"**{title}**" in notes, f"{path.name}: no note explains {title}"
    flux = json.loads((ROOT / "workflows" / "flux_dev_txt2img_pag.json").read_text())
    flux_notes = " ".join(n["widgets_values"][0] for n in flux["nodes"] if n["type"] == "MarkdownNote")
    assert "Adaptive Guidance is absent" in flux_notes and "no real CFG" in flux_notes


def test_the_cli_does_not_import_comfyui():
    code = (
        "import sys; import fgcli.cli, fgcli.convert, fgcli.client, fgcli.build; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('comfy', 'torch', 'nodes', 'server', 'folder_paths')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_widget_layout_follows_the_editor(object_info):
    layout = [(w.name, w.serialize) for w in convert.widget_layout(object_info["KSampler"])]
    assert layout[:3] == [("seed", True), ("control_after_generate", False), ("steps", True)]
    load_image = [(w.name, w.serialize) for w in convert.widget_layout(object_info["LoadImage"])]
    assert load_image == [("image", True), ("upload", False)]


@pytest.mark.parametrize("path", TEMPLATES + FIXTURES, ids=_ids(TEMPLATES + FIXTURES))
def test_loads_in_the_real_editor_and_matches_its_conversion(path, editor, object_info, artifacts):
    workflow = json.loads(path.read_text())
    report = editor.load(workflow, path.stem)
    shot = editor.screenshot(path.stem)
    assert shot.stat().st_size > 10_000
    assert report["missing"] == [], f"missing node types: {report['missing']}"
    assert not report["missing_shown"] and not report["dialogs"], report
    assert not [t for t in report["toasts"] if "alidation" in t or "rror" in t], report["toasts"]
    assert report["node_count"] == len(workflow["nodes"])
    assert not editor.unexpected_console_errors(), editor.unexpected_console_errors()

    frontend = editor_output(editor)
    ours = convert.ui_to_api(workflow, object_info, frontend=editor.frontend.version)
    untitled_titles_as_the_cli_writes_them(frontend, ours, object_info)
    differing = {
        k: (frontend.get(k), ours.get(k)) for k in set(frontend) | set(ours) if frontend.get(k) != ours.get(k)
    }
    assert not differing, "converter differs from the editor's graphToPrompt (editor, ours):\n" + json.dumps(
        differing, indent=1
    )


HEADLESS = TEMPLATES + [p for p in FIXTURES if p.stem.startswith("subgraph_")]


@pytest.mark.parametrize("path", HEADLESS, ids=_ids(HEADLESS))
def test_runs_headless_through_the_cli(path, server, tmp_path):
    """convert → (substitute what cannot be tiny) → queue with small sizes via --set; outputs downloaded."""
    converted = cli("convert", str(path), "--server", server.url)
    assert converted.returncode == 0, converted.stderr
    prompt = json.loads(converted.stdout)
    prompt, substituted = template_models.substitute(prompt)
    overrides = template_models.shrink_overrides(prompt)
    if substituted:  # queue the substituted API prompt
        target = tmp_path / "prompt.json"
        target.write_text(json.dumps(prompt))
    else:  # queue the template file itself
        target = path
    print(f"{path.name}: substituted {substituted or 'nothing'}; --set {overrides}")
    started = time.time()
    args = ["queue", str(target), "--server", server.url, "--out", str(tmp_path / "out"), "--json", "--quiet"]
    for item in overrides:
        args += ["--set", item]
    result = cli(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"{path.name}: {summary['status']} in {time.time() - started:.1f}s, files {summary['files']}")
    assert summary["status"] == "success"
    assert summary["files"], "no output file"
    for file in summary["files"]:
        assert Path(file).stat().st_size > 0
    counts = summary["evaluations"]
    assert counts and all(c["total"] > 0 for c in counts)  # every sampler's model ran
    types = {n["type"] for n in json.loads(path.read_text())["nodes"]}
    if types & {"FreeGuidanceFouriScale", "FreeGuidanceDiffuseHigh"}:
        # the sizes shrink together (template_models.shrink): the smallest is 64 px, a 2x target stays 2x
        from PIL import Image

        sizes = {Image.open(f).size for f in summary["files"] if f.endswith(".png")}
        assert sizes == {(128, 128)}, sizes
    for title in ("CFG Interval", "Adaptive Guidance"):
        if TELEMETRY_NODES[title] not in types:
            continue
        records = [r for r in summary["telemetry"] if r["title"] == title]
        assert len(records) == 1, f"no {title} telemetry in the history"
        steps = records[0]["steps"]
        # one record per main evaluation: 3 steps; a two-pass template's node sees its own pass only
        assert len(steps) >= (3 if len(counts) == 1 else 1)
        # every unconditional evaluation the counter saw is a recorded step where the uncond pass ran (for a
        # two-pass template: the counter of the node's own pass)
        ran = sum("uncond" in s["ran"] for s in steps)
        assert any(c["uncond"] == ran for c in counts), (counts, steps)
        for step in steps:
            if step["skipped"]:
                assert step["skipped"] == ["uncond"] and step["scale"] == 1.0 and step["cosine_x0"] is None
            else:
                assert step["scale"] > 1.0 and -1.0 <= step["cosine_x0"] <= 1.0


TELEMETRY_NODES = {
    "CFG Interval": "FreeGuidanceCFGInterval",
    "Adaptive Guidance": "FreeGuidanceAdaptiveGuidance",
}


def test_queue_shows_the_servers_node_errors(server):
    path = ROOT / "workflows" / "sd15_txt2img_ag_pag.json"
    result = cli(
        "queue", str(path), "--server", server.url, "--quiet",
        "--set", "FreeGuidanceAdaptiveGuidance.threshold=1.5",
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert "server rejected the prompt" in result.stderr
    assert "FreeGuidanceAdaptiveGuidance" in result.stderr and "threshold" in result.stderr, result.stderr


def test_the_telemetry_chart_is_drawn_on_the_guidance_node_after_a_run(editor):
    """Queue the SD1.5 template from the editor itself; the Adaptive Guidance node gets its chart, a DOM
    widget that both renderers show (Nodes 2.0 never calls onDrawForeground). Read back from its pixels.

    Threshold −1 makes the switch deterministic: step 0 runs CFG, every later step skips the uncond pass.
    """
    path = ROOT / "workflows" / "sd15_txt2img_ag_pag.json"
    editor.load(json.loads(path.read_text()), "telemetry-chart")
    page = editor.page
    node_id = page.evaluate(
        """() => {
          const node = app.graph.nodes.find((n) => n.type === "FreeGuidanceAdaptiveGuidance");
          const set = (n, name, value) => { n.widgets.find((w) => w.name === name).value = value; };
          set(node, "threshold", -1.0);
          for (const n of app.graph.nodes) {
            if (n.type === "EmptyLatentImage") { set(n, "width", 64); set(n, "height", 64); }
            if (n.type === "KSampler") { set(n, "steps", 6); }
          }
          return node.id;
        }"""
    )
    page.evaluate("async () => { await app.queuePrompt(0, 1); }")
    page.wait_for_function(
        f"() => app.graph.getNodeById({node_id})?.freeGuidanceChart?.bars?.length === 6", timeout=420_000
    )
    # the record arrived: as the telemetry event (1.27) or as the report's "executed" output (both carry it)
    delivered = page.evaluate("() => window.__freeGuidanceTelemetry")
    assert delivered["events"] >= 1 or (editor.frontend.newest and delivered["executed"] >= 1), delivered
    page.wait_for_timeout(500)  # let the editor place the widget
    chart = page.evaluate(
        f"""() => {{
          const node = app.graph.getNodeById({node_id});
          const widget = node.widgets.find((w) => w.name === "free_guidance_chart");
          const element = widget.chartCanvas;
          const box = element.getBoundingClientRect();
          return {{
            record: node.freeGuidanceTelemetry, chart: node.freeGuidanceChart,
            shown: element.isConnected && element.offsetParent !== null && box.width > 0 && box.height > 0,
            widgets_values: node.serialize().widgets_values,
          }};
        }}"""
    )
    editor.screenshot("telemetry-chart")
    steps = chart["record"]["steps"]
    assert len(steps) == 6
    skipped = [bool(s["skipped"]) for s in steps]
    assert skipped == [False] + [True] * 5, skipped  # switched after the first step
    assert -1.0 <= steps[0]["cosine_x0"] <= 1.0 and steps[0]["scale"] == 7.0
    assert [b["skipped"] for b in chart["chart"]["bars"]] == skipped
    assert chart["shown"], f"the chart is not on the page in {editor.frontend.id}"
    assert len(chart["widgets_values"]) == 2  # threshold, start_percent: the chart is never saved

    def pixel(x: float, y: float) -> list[int]:
        return page.evaluate(
            f"""() => {{
              const node = app.graph.getNodeById({node_id});
              const element = node.widgets.find((w) => w.name === "free_guidance_chart").chartCanvas;
              return Array.from(element.getContext("2d").getImageData({round(x)}, {round(y)}, 1, 1).data);
            }}"""
        )

    box = chart["chart"]
    background = pixel(box["width"] - 2, 2)
    assert background[:3] == [0x14, 0x20, 0x2B], background
    for bar, was_skipped in zip(box["bars"], skipped, strict=True):
        centre_x = bar["x"] + bar["w"] / 2
        mark = pixel(centre_x, box["height"] - 4)
        assert (mark[:3] == [0xE0, 0x48, 0x3E]) == was_skipped, (mark, was_skipped)
        assert pixel(centre_x, bar["bottom"] - 1)[:3] == [0x4C, 0xAF, 0x50]
    assert not editor.unexpected_console_errors(), editor.unexpected_console_errors()


_EDITOR_WIDGETS_JS = """async (types) => {
  const out = {};
  for (const type of types) {
    const node = LiteGraph.createNode(type);
    if (!node) continue;
    app.graph.add(node);
    out[type] = (node.widgets || []).map((w) => [w.name, w.options?.serialize !== false, w.serialize !== false]);
    app.graph.remove(node);
  }
  return out;
}"""


def test_widget_layouts_match_the_editor_for_every_node_type(editor, object_info):
    """The widgets the editor creates (frontend-only ones included: buttons, 3D viewers, audio UI, webcam)
    are the converter's, in order, with the same "sent in the prompt" and "kept in widgets_values" flags."""
    layouts = editor.page.evaluate(_EDITOR_WIDGETS_JS, sorted(object_info))
    assert len(layouts) == len(object_info)
    newest = editor.frontend.newest
    differing = {}
    for node_type, widgets in layouts.items():
        ours = [
            [w.name, w.serialize, w.stored] for w in convert.widget_layout(object_info[node_type], newest)
        ]
        if widgets != ours:
            differing[node_type] = {"editor": widgets, "ours": ours}
    assert not differing, json.dumps(differing, indent=1)


def test_missing_node_types_are_reported_as_each_frontend_shows_them(editor):
    """1.27 opens a dialog, the newest shows 'Missing node: T' cards; either way the test reads it."""
    workflow = json.loads((ROOT / "workflows" / "sd15_txt2img_ag_pag.json").read_text())
    workflow["nodes"][0]["type"] = "FGTestNotInstalled"
    report = editor.load(workflow, "missing-node")
    assert report["missing"] == ["FGTestNotInstalled"], report
    assert any("FGTestNotInstalled" in text for text in report["missing_shown"]), report
