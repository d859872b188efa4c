"""fgcli without a server: the conversion rules on hand-written node definitions, input overrides, grids and
"control after generate". (Parity with the real editor is in test_workflows.py.)"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fgcli import cli, convert  # noqa: E402

INFO = {
    "Seeded": {
        "input": {
            "required": {
                "model": ["MODEL", {}],
                "seed": ["INT", {"default": 0, "min": 0, "max": 100, "control_after_generate": True}],
                "mode": [["a", "b"], {}],
                "scale": ["FLOAT", {"default": 1.5}],
            },
            "optional": {"extra": ["STRING", {"forceInput": True}], "flag": ["BOOLEAN", {"default": False}]},
        },
        "input_order": {"required": ["model", "seed", "mode", "scale"], "optional": ["extra", "flag"]},
        "output": ["MODEL"],
        "display_name": "Seeded Node",
    },
    "Source": {"input": {"required": {}}, "output": ["MODEL", "STRING"], "display_name": None},
}


def test_widget_layout_inserts_the_control_widget_and_skips_sockets():
    layout = [(w.name, w.serialize) for w in convert.widget_layout(INFO["Seeded"])]
    assert layout == [
        ("seed", True),
        ("control_after_generate", False),
        ("mode", True),
        ("scale", True),
        ("flag", True),
    ]


def workflow(mode_of_source=0):
    return {
        "nodes": [
            {
                "id": 1,
                "type": "Source",
                "mode": mode_of_source,
                "inputs": [],
                "outputs": [
                    {"name": "MODEL", "type": "MODEL", "links": [1]},
                    {"name": "STRING", "type": "STRING", "links": [2]},
                ],
            },
            {
                "id": 2,
                "type": "Seeded",
                "mode": 0,
                "title": "Mine",
                "inputs": [
                    {"name": "model", "type": "MODEL", "link": 1},
                    {"name": "extra", "type": "STRING", "link": 2},
                ],
                "outputs": [{"name": "MODEL", "type": "MODEL", "links": []}],
                "widgets_values": [7, "fixed", "b", [1, 2]],
            },
            {"id": 3, "type": "Note", "mode": 0, "inputs": [], "outputs": [], "widgets_values": ["hi"]},
        ],
        "links": [[1, 1, 0, 2, 0, "MODEL"], [2, 1, 1, 2, 1, "STRING"]],
        "version": 0.4,
    }


def test_conversion_values_links_defaults_titles_and_list_wrapping():
    prompt = convert.ui_to_api(workflow(), INFO)
    assert set(prompt) == {"1", "2"}  # the note is editor-only
    assert prompt["1"]["_meta"]["title"] == "Source"  # no display name: the class name
    assert prompt["2"] == {
        "inputs": {
            "seed": 7,
            "mode": "b",
            "scale": {"__value__": [1, 2]},  # a list value is wrapped, never read as a link
            "flag": False,  # widgets_values too short: the default
            "model": ["1", 0],
            "extra": ["1", 1],
        },
        "class_type": "Seeded",
        "_meta": {"title": "Mine"},
    }


def test_a_muted_source_removes_the_inputs_it_fed():
    prompt = convert.ui_to_api(workflow(mode_of_source=2), INFO)
    assert (
        set(prompt) == {"2"} and "model" not in prompt["2"]["inputs"] and "extra" not in prompt["2"]["inputs"]
    )


def test_missing_node_types_are_clear_errors_unless_bypassed_or_muted():
    broken = workflow()
    broken["nodes"][0]["type"] = "NotInstalled"
    with pytest.raises(convert.MissingNodeTypes, match="NotInstalled"):
        convert.ui_to_api(broken, INFO)
    for mode in (convert.MODE_NEVER, convert.MODE_BYPASS):  # the editors drop such a node
        broken["nodes"][0]["mode"] = mode
        prompt = convert.ui_to_api(broken, INFO)
        assert set(prompt) == {"2"} and "model" not in prompt["2"]["inputs"]


def subgraph_workflow(instance_mode=0, seed_values=(1234,)):
    """Source → [subgraph: Seeded, its seed promoted] → nothing; the definition is used by two instances."""
    definition = {
        "id": "sub-1",
        "name": "Wrapped",
        "inputs": [
            {"id": "a", "name": "model", "type": "MODEL", "linkIds": [11]},
            {"id": "b", "name": "seed", "type": "INT", "linkIds": [12]},
        ],
        "outputs": [{"id": "c", "name": "MODEL", "type": "MODEL", "linkIds": [13]}],
        "nodes": [
            {
                "id": 2,
                "type": "Seeded",
                "mode": 0,
                "inputs": [
                    {"name": "model", "type": "MODEL", "link": 11},
                    {"name": "seed", "type": "INT", "link": 12, "widget": {"name": "seed"}},
                ],
                "outputs": [{"name": "MODEL", "type": "MODEL", "links": [13]}],
                "widgets_values": [5, "fixed", "a", 2.0, True],
            }
        ],
        "links": [
            {"id": 11, "origin_id": -10, "origin_slot": 0, "target_id": 2, "target_slot": 0, "type": "MODEL"},
            {"id": 12, "origin_id": -10, "origin_slot": 1, "target_id": 2, "target_slot": 4, "type": "INT"},
            {"id": 13, "origin_id": 2, "origin_slot": 0, "target_id": -20, "target_slot": 0, "type": "MODEL"},
        ],
    }
    instance = {
        "type": "sub-1",
        "mode": instance_mode,
        "inputs": [{"name": "model", "type": "MODEL", "link": 1}],
        "outputs": [{"name": "MODEL", "type": "MODEL", "links": [2]}],
    }
    source = {
        "id": 1,
        "type": "Source",
        "mode": 0,
        "inputs": [],
        "outputs": [{"name": "MODEL", "type": "MODEL", "links": [1, 3]}],
    }
    consumer = {  # reads the first instance's output
        "id": 9,
        "type": "Seeded",
        "mode": 0,
        "inputs": [{"name": "model", "type": "MODEL", "link": 2}],
        "outputs": [],
        "widgets_values": [0, "fixed", "b", 1.0, False],
    }
    nodes = [source, consumer]
    links = [[2, 15, 0, 9, 0, "MODEL"]]
    for index, seed in enumerate(seed_values):
        node_id = 15 + index
        nodes.append(
            {**instance, "id": node_id, "inputs": [{"name": "model", "type": "MODEL", "link": 1 + 2 * index}]}
        )
        nodes[-1]["widgets_values"] = [seed]
        links.append([1 + 2 * index, 1, 0, node_id, 0, "MODEL"])
    return {"nodes": nodes, "links": links, "definitions": {"subgraphs": [definition]}, "version": 0.4}


def test_subgraphs_are_flattened_with_the_editors_ids_links_and_promoted_values():
    prompt = convert.ui_to_api(subgraph_workflow(seed_values=(1234, 777)), INFO)
    assert set(prompt) == {"1", "9", "15:2", "16:2"}  # the instances are virtual, their inner nodes are not
    assert prompt["15:2"]["inputs"]["model"] == ["1", 0]  # through the subgraph's input node
    assert (
        prompt["15:2"]["inputs"]["seed"] == 1234 and prompt["16:2"]["inputs"]["seed"] == 777
    )  # per instance
    assert prompt["15:2"]["inputs"]["mode"] == "a"  # a widget that is not promoted: the definition's value
    assert prompt["9"]["inputs"]["model"] == ["15:2", 0]  # through the subgraph's output node
    wf = subgraph_workflow()
    del wf["nodes"][2]["widgets_values"]  # no value on the instance: the inner widget's
    assert convert.ui_to_api(wf, INFO)["15:2"]["inputs"]["seed"] == 5


def test_bypassed_and_muted_subgraph_nodes_follow_each_editor():
    bypassed = subgraph_workflow(instance_mode=convert.MODE_BYPASS)
    newest = convert.ui_to_api(bypassed, INFO, frontend="1.58.1")
    assert set(newest) == {"1", "9"} and newest["9"]["inputs"]["model"] == ["1", 0]  # rewired past it
    pinned = convert.ui_to_api(bypassed, INFO, frontend="1.27.10")  # 1.27 still sends what is inside
    assert set(pinned) == {"1", "9", "15:2"} and pinned["9"]["inputs"]["model"] == ["1", 0]
    muted = convert.ui_to_api(subgraph_workflow(instance_mode=convert.MODE_NEVER), INFO, frontend="1.58.1")
    assert set(muted) == {"1", "9"} and "model" not in muted["9"]["inputs"]


def test_set_input_addresses_nodes_inside_subgraphs():
    prompt = convert.ui_to_api(subgraph_workflow(seed_values=(1, 2)), INFO)
    convert.set_input(prompt, "16:2.seed=42")
    convert.set_input(prompt, "15:Seeded.scale=9.5")  # the node of that class directly inside instance 15
    assert prompt["16:2"]["inputs"]["seed"] == 42 and prompt["15:2"]["inputs"]["scale"] == 9.5
    with pytest.raises(convert.ConversionError, match="several nodes"):
        convert.set_input(prompt, "Seeded.seed=1")
    with pytest.raises(convert.ConversionError, match="no subgraph node"):
        convert.set_input(prompt, "99:Seeded.seed=1")


def test_frontend_only_widgets_are_laid_out_and_sent_like_the_editor():
    load_3d = {
        "name": "Load3D",
        "input": {
            "required": {
                "model_file": [[], {"file_upload": True}],
                "image": ["LOAD_3D", {}],
                "width": ["INT", {"default": 1024}],
                "height": ["INT", {"default": 1024}],
            }
        },
    }
    names = [w.name for w in convert.widget_layout(load_3d)]
    assert names == [
        "model_file",
        "upload 3d model",
        "upload extra resources",
        "clear",
        "image",
        "width",
        "height",
    ]
    node = {"id": 1, "type": "Load3D", "inputs": [], "outputs": [], "mode": 0}
    node["widgets_values"] = ["a.glb", "upload3dmodel", "uploadExtraResources", "clear", "", 640, 480]
    prompt = convert.ui_to_api({"nodes": [node], "links": []}, {"Load3D": load_3d})
    assert prompt["1"]["inputs"] == {
        "model_file": "a.glb",
        "upload 3d model": "upload3dmodel",
        "upload extra resources": "uploadExtraResources",
        "clear": "clear",
        "image": "",
        "width": 640,  # never a button's value
        "height": 480,
    }
    record = {"name": "RecordAudio", "input": {"required": {"audio": ["AUDIO_RECORD", {}]}}}
    node = {
        "id": 1,
        "type": "RecordAudio",
        "inputs": [],
        "outputs": [],
        "mode": 0,
        "widgets_values": ["r.wav", ""],
    }
    for version in ("1.27.10", "1.58.1"):
        prompt = convert.ui_to_api({"nodes": [node], "links": []}, {"RecordAudio": record}, frontend=version)
        assert prompt["1"]["inputs"] == {"audio": "r.wav"}  # the required input is sent


def test_set_input_by_id_title_and_class_type():
    prompt = convert.ui_to_api(workflow(), INFO)
    convert.set_input(prompt, "2.seed=9")
    convert.set_input(prompt, "Mine.mode=a")
    convert.set_input(prompt, "Seeded.scale=[3, 4]")
    assert prompt["2"]["inputs"]["seed"] == 9 and prompt["2"]["inputs"]["mode"] == "a"
    assert prompt["2"]["inputs"]["scale"] == {"__value__": [3, 4]}
    with pytest.raises(convert.ConversionError, match="no node"):
        convert.set_input(prompt, "Nope.seed=1")


def test_control_after_generate_between_queues():
    wf = workflow()
    node = wf["nodes"][1]
    node["widgets_values"][1] = "increment"
    convert.apply_seed_controls(wf, INFO, random.Random(0))
    assert node["widgets_values"][0] == 8
    node["widgets_values"][1] = "randomize"
    convert.apply_seed_controls(wf, INFO, random.Random(0))
    assert 0 <= node["widgets_values"][0] <= 100
    node["widgets_values"][:2] = [100, "increment"]
    convert.apply_seed_controls(wf, INFO, random.Random(0))
    assert node["widgets_values"][0] == 100  # clamped to max


def test_grid_syntax(tmp_path):
    values = tmp_path / "v.txt"
    values.write_text("a cat, sitting\n\na dog\n")
    assert cli.parse_grid(f"Positive.text=@{values}") == ("Positive.text", ["a cat, sitting", "a dog"])
    assert cli.parse_grid("3.seed=1,2,3") == ("3.seed", [1, 2, 3])
    assert cli.parse_grid('3.text=["x, y", "z"]') == ("3.text", ["x, y", "z"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["convert", "MISSING.json"], "MISSING.json: no such file"),
        (["convert", "{tmp}/bad.json"], "not valid JSON"),
        (["convert", "{tmp}/prompt.json", "-o", "{tmp}/no/such/folder/out.json"], "does not exist"),
        (["convert", "{tmp}"], "not a file"),
        (["convert", "{tmp}/list.json"], "neither a UI workflow nor an API prompt"),
        (["sweep", "{tmp}/prompt.json"], "--server URL"),
        (
            ["sweep", "{tmp}/prompt.json", "--server", "http://127.0.0.1:9", "--grid", "1.seed=@{tmp}/none"],
            "no such file",
        ),
        (
            ["sweep", "{tmp}/prompt.json", "--server", "http://127.0.0.1:9", "--grid", "1.seed=[1,"],
            "not a JSON list",
        ),
        (["queue"], "required"),
        (["frobnicate"], "invalid choice"),
        (["queue", "{tmp}/prompt.json", "--count", "many"], "invalid int value"),
    ],
)
def test_every_misuse_is_one_line_and_exit_status_2(argv, message, tmp_path, capsys):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "prompt.json").write_text('{"1": {"class_type": "Seeded", "inputs": {"seed": 1}}}')
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    assert code == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], captured.err
    assert "Traceback" not in captured.err
