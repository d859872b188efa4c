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


def test_missing_node_types_and_subgraphs_are_clear_errors():
    broken = workflow()
    broken["nodes"][0]["type"] = "NotInstalled"
    with pytest.raises(convert.MissingNodeTypes, match="NotInstalled"):
        convert.ui_to_api(broken, INFO)
    with pytest.raises(convert.ConversionError, match="subgraphs"):
        convert.ui_to_api({**workflow(), "definitions": {"subgraphs": [{"id": "x"}]}}, INFO)


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
