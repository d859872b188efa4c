"""Build UI-format workflows (editor JSON, version 0.4) in Python from a server's ``/object_info``.

Used to author the templates in ``workflows/`` (scripts/make_templates.py); the result loads in the editor
like a saved workflow. Only what the editor needs is written: nodes with their sockets, linked widget
inputs, outputs and ``widgets_values`` in the editor's widget order (see ``convert.widget_layout``), links,
groups and Note nodes; the editor fills in the rest on load.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import convert

CHART_ROOM = 80


@dataclass(frozen=True)
class Out:
    node: int
    slot: int
    type: str


class Node:
    def __init__(self, workflow: UIWorkflow, data: dict):
        self.workflow = workflow
        self.data = data

    @property
    def id(self) -> int:
        return self.data["id"]

    def out(self, slot: int | str = 0) -> Out:
        outputs = self.data["outputs"]
        if isinstance(slot, str):
            slot = next(i for i, o in enumerate(outputs) if o["name"] == slot or o["type"] == slot)
        return Out(self.id, slot, outputs[slot]["type"])


class UIWorkflow:
    def __init__(self, object_info: dict):
        self.object_info = object_info
        self.nodes: list[dict] = []
        self.links: list[list] = []
        self.groups: list[dict] = []
        self._column_rows: dict[int, float] = {}

    def _place(self, column: int, height: float) -> list[float]:
        y = self._column_rows.get(column, 0.0)
        self._column_rows[column] = y + height + 60
        return [column * 380.0, y]

    def node(
        self,
        class_type: str,
        *,
        column: int,
        title: str | None = None,
        node_mode: int = convert.MODE_ALWAYS,
        controls: dict[str, str] | None = None,
        **values: Any,
    ) -> Node:
        """A node; keyword values are widget values or ``Out`` links (to a socket or a widget input).

        ``node_mode`` is the editor's node mode (0 always, 2 muted, 4 bypassed), apart from the node's inputs
        (some have one named ``mode``).
        """
        node_def = self.object_info[class_type]
        layout = convert.widget_layout(node_def)
        specs = {name: spec for name, spec, _ in convert.ordered_inputs(node_def)}
        unknown = set(values) - set(specs)
        if unknown:
            raise KeyError(f"{class_type} has no inputs {sorted(unknown)}")
        node_id = len(self.nodes) + 1
        inputs: list[dict] = []
        widget_inputs: list[dict] = []
        for name, spec, _ in convert.ordered_inputs(node_def):
            kind = convert.input_type(spec)
            value = values.get(name)
            if convert.is_widget_input(spec):
                if isinstance(value, Out):
                    widget_inputs.append(
                        {"name": name, "type": kind, "widget": {"name": name}, "link": value}
                    )
            elif kind != "IMAGEUPLOAD":
                inputs.append({"name": name, "type": kind, "link": value if isinstance(value, Out) else None})
        inputs.extend(widget_inputs)
        widgets_values = []
        for index, widget in enumerate(layout):
            if widget.serialize:
                value = values.get(widget.name, widget.default)
                widgets_values.append(widget.default if isinstance(value, Out) else value)
            elif widget.name == "upload" or widget.name == "control_filter_list":
                widgets_values.append(widget.default)
            else:
                target = layout[index - 1].name
                widgets_values.append((controls or {}).get(target, "fixed"))
        outputs = [
            {"name": name, "type": kind, "links": []}
            for name, kind in zip(
                node_def.get("output_name") or node_def["output"], node_def["output"], strict=True
            )
        ]
        rows = max(len(inputs), len(outputs))
        tall = sum(
            3 if (specs[w.name][1] if len(specs.get(w.name, [])) > 1 else {}).get("multiline") else 1
            for w in layout
            if w.name in specs
        )
        size = [320, 46 + 22 * rows + 26 * tall]
        hidden = (node_def.get("input") or {}).get("hidden") or {}
        if class_type.startswith("FreeGuidance") and "UNIQUE_ID" in hidden.values():
            size[1] += CHART_ROOM  # room for the telemetry chart drawn after a run (web/)
        data = {
            "id": node_id,
            "type": class_type,
            "pos": self._place(column, size[1]),
            "size": size,
            "flags": {},
            "order": node_id - 1,
            "mode": node_mode,
            "inputs": inputs,
            "outputs": outputs,
            "properties": {"Node name for S&R": class_type},
            "widgets_values": widgets_values,
        }
        if title:
            data["title"] = title
        self.nodes.append(data)
        for target_slot, item in enumerate(inputs):
            if isinstance(item["link"], Out):
                source = self.nodes[item["link"].node - 1]
                if source["type"] == "PrimitiveNode" and item.get("widget"):
                    source["outputs"][0]["widget"] = {"name": item["name"]}
                    source["outputs"][0]["name"] = item["type"]
                item["link"] = self._link(item["link"], node_id, target_slot, item["type"])
        return Node(self, data)

    def _link(self, source: Out, target: int, target_slot: int, kind: str) -> int:
        link_id = len(self.links) + 1
        self.links.append([link_id, source.node, source.slot, target, target_slot, source.type])
        self.nodes[source.node - 1]["outputs"][source.slot]["links"].append(link_id)
        return link_id

    def note(
        self, text: str, *, column: int, title: str = "Note", width: int = 360, height: int = 160
    ) -> Node:
        node_id = len(self.nodes) + 1
        data = {
            "id": node_id,
            "type": "MarkdownNote",
            "pos": self._place(column, height),
            "size": [width, height],
            "flags": {},
            "order": node_id - 1,
            "mode": convert.MODE_ALWAYS,
            "inputs": [],
            "outputs": [],
            "title": title,
            "properties": {},
            "widgets_values": [text],
            "color": "#432",
            "bgcolor": "#653",
        }
        self.nodes.append(data)
        return Node(self, data)

    def reroute(self, source: Out, *, column: int) -> Node:
        """A legacy Reroute node (editor-only) passing ``source`` on."""
        node_id = len(self.nodes) + 1
        data = {
            "id": node_id,
            "type": "Reroute",
            "pos": self._place(column, 26),
            "size": [75, 26],
            "flags": {},
            "order": node_id - 1,
            "mode": convert.MODE_ALWAYS,
            "inputs": [{"name": "", "type": "*", "link": None}],
            "outputs": [{"name": "", "type": source.type, "links": []}],
            "properties": {"showOutputText": False, "horizontal": False},
        }
        self.nodes.append(data)
        data["inputs"][0]["link"] = self._link(source, node_id, 0, source.type)
        return Node(self, data)

    def primitive(
        self, kind: str, value: Any, *, column: int, control: str | None = None, title=None
    ) -> Node:
        """A PrimitiveNode (editor-only) holding ``value``; link its ``out()`` to widget inputs of that type."""
        node_id = len(self.nodes) + 1
        data = {
            "id": node_id,
            "type": "PrimitiveNode",
            "pos": self._place(column, 82),
            "size": [210, 82],
            "flags": {},
            "order": node_id - 1,
            "mode": convert.MODE_ALWAYS,
            "inputs": [],
            "outputs": [{"name": kind, "type": kind, "links": [], "widget": {"name": "value"}}],
            "properties": {"Run widget replace on values": False},
            "widgets_values": [value] + ([control] if control else []),
        }
        if title:
            data["title"] = title
        self.nodes.append(data)
        return Node(self, data)

    def group(self, title: str, nodes: list[Node], color: str = "#3f789e") -> None:
        xs = [n.data["pos"][0] for n in nodes] + [n.data["pos"][0] + n.data["size"][0] for n in nodes]
        ys = [n.data["pos"][1] for n in nodes] + [n.data["pos"][1] + n.data["size"][1] for n in nodes]
        self.groups.append(
            {
                "id": len(self.groups) + 1,
                "title": title,
                "bounding": [min(xs) - 20, min(ys) - 60, max(xs) - min(xs) + 40, max(ys) - min(ys) + 80],
                "color": color,
                "font_size": 24,
                "flags": {},
            }
        )

    def to_json(self) -> dict:
        return {
            "last_node_id": len(self.nodes),
            "last_link_id": len(self.links),
            "nodes": self.nodes,
            "links": self.links,
            "groups": self.groups,
            "config": {},
            "extra": {"ds": {"scale": 0.75, "offset": [40, 60]}},
            "version": 0.4,
        }
