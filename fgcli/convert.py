"""UI-format workflow (what the ComfyUI editor saves) → API prompt (what the server executes).

ComfyUI has no Python converter; the editor converts in JavaScript (``graphToPrompt`` in the frontend). This
module follows the rules of the pinned frontend (``comfyui-frontend-package`` 1.27.10) and is tested for
parity with it in a real browser (tests/test_workflows_browser.py):

- widget values: ``widgets_values`` is positional over the node's *widgets*, built from ``/object_info`` in
  ``input_order`` (required, then optional, then inputs added by the editor); INT inputs with
  ``control_after_generate`` (and, by the legacy convention, any INT input named ``seed`` or ``noise_seed``)
  are followed by a "control after generate" widget, combos with ``control_after_generate`` by a control and a
  filter widget, media combos (``image_upload``...) by an upload button; those extra widgets are not sent;
- list values are wrapped as ``{"__value__": [...]}`` (a bare list would read as a link);
- links: ``[origin_id, origin_slot]``, resolved through Reroute nodes and bypassed nodes (mode 4: the first
  input of the requested type is followed); a muted node (mode 2) is dropped and so is every input linked to it;
- Note, MarkdownNote, Reroute and PrimitiveNode are editor-only (never sent); a PrimitiveNode's value replaces
  the widget value of every input it feeds;
- groups are drawing only; subgraphs and legacy group nodes are not supported (a clear error);
- every node gets ``_meta.title``: its own title, else the node definition's display name.

Plain Python, no ComfyUI import: it runs on any machine that can reach a server's ``/object_info``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

MODE_ALWAYS = 0
MODE_NEVER = 2  # "muted"
MODE_BYPASS = 4

VIRTUAL_TYPES = frozenset({"Note", "MarkdownNote", "Reroute", "PrimitiveNode"})
# Widget constructors of the pinned frontend (scripts/widgets.ts, ComfyWidgets); an input of any other type is
# a socket.
WIDGET_TYPES = frozenset(
    {
        "INT",
        "FLOAT",
        "BOOLEAN",
        "STRING",
        "MARKDOWN",
        "COMBO",
        "IMAGEUPLOAD",
        "FILEUPLOAD",
        "COLOR",
        "IMAGECOMPARE",
        "TREESELECT",
        "MULTISELECT",
        "CHART",
        "GALLERIA",
        "SELECTBUTTON",
        "TEXTAREA",
    }
)
UPLOAD_OPTIONS = ("image_upload", "video_upload", "animated_image_upload")


class ConversionError(ValueError):
    """The workflow cannot be converted; the message says which node and why."""


class MissingNodeTypes(ConversionError):
    def __init__(self, missing: dict[str, list]):
        self.missing = missing
        names = ", ".join(f"{t} (node {', '.join(map(str, ids))})" for t, ids in sorted(missing.items()))
        super().__init__(f"node types unknown to the server: {names}")


@dataclass(frozen=True)
class Widget:
    """One widget of a node, in the order the editor creates them."""

    name: str
    serialize: bool  # False: control/filter/upload widgets, stored in widgets_values but never sent
    default: Any = None


def input_type(spec: list | tuple) -> str:
    kind = spec[0]
    if isinstance(kind, (list, tuple)):
        return "COMBO"
    return str(kind)


def _options(spec) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def ordered_inputs(node_def: dict) -> list[tuple[str, list, bool]]:
    """``(name, spec, optional)`` in the editor's order: input_order required, optional, then the rest."""
    inputs = node_def.get("input") or {}
    required = dict(inputs.get("required") or {})
    optional = dict(inputs.get("optional") or {})
    # The editor's Comfy.UploadImage extension adds an IMAGEUPLOAD input after a media combo.
    for name, spec in list(required.items()):
        options = _options(spec)
        if input_type(spec) == "COMBO" and any(options.get(o) is True for o in UPLOAD_OPTIONS):
            required["upload"] = ["IMAGEUPLOAD", {**options, "imageInputName": name}]
            break
    order = node_def.get("input_order") or {}
    result: list[tuple[str, list, bool]] = []
    seen: set[str] = set()
    if order:
        for name in order.get("required") or []:
            if name in required:
                result.append((name, required[name], False))
                seen.add(name)
        for name in order.get("optional") or []:
            if name in optional:
                result.append((name, optional[name], True))
                seen.add(name)
    for name, spec in required.items():
        if name not in seen:
            result.append((name, spec, False))
            seen.add(name)
    for name, spec in optional.items():
        if name not in seen:
            result.append((name, spec, True))
    return result


def _default(kind: str, spec) -> Any:
    options = _options(spec)
    if "default" in options:
        return options["default"]
    if kind == "COMBO":
        values = spec[0] if isinstance(spec[0], (list, tuple)) else options.get("options") or []
        return values[0] if values else None
    return {"INT": 0, "FLOAT": 0.0, "BOOLEAN": False, "STRING": ""}.get(kind)


def is_widget_input(spec) -> bool:
    return input_type(spec) in WIDGET_TYPES and not _options(spec).get("forceInput")


def widget_layout(node_def: dict) -> list[Widget]:
    """The node's widgets in creation order; positions match ``widgets_values``."""
    widgets: list[Widget] = []
    for name, spec, optional in ordered_inputs(node_def):
        options = _options(spec)
        if optional and options.get("defaultInput"):
            continue  # migrated to forceInput by the editor
        if not is_widget_input(spec):
            continue
        kind = input_type(spec)
        if kind == "IMAGEUPLOAD":
            widgets.append(Widget(name, serialize=False, default="image"))
            continue
        widgets.append(Widget(name, serialize=True, default=_default(kind, spec)))
        control = options.get("control_after_generate")
        if kind == "INT":
            if control is None:
                control = name in ("seed", "noise_seed")
            if control:
                widgets.append(Widget(_control_name(options), serialize=False, default="randomize"))
        elif kind == "COMBO" and control:
            widgets.append(Widget(_control_name(options), serialize=False, default="randomize"))
            widgets.append(Widget("control_filter_list", serialize=False, default=""))
    return widgets


def _control_name(options: dict) -> str:
    value = options.get("control_after_generate")
    if isinstance(value, str):
        return value
    if options.get("control_prefix"):
        return f"{options['control_prefix']} control_after_generate"
    return "control_after_generate"


def widget_values(node: dict, node_def: dict) -> dict[str, Any]:
    """``{widget name: value}`` for every widget of a UI node (defaults where widgets_values is short)."""
    layout = widget_layout(node_def)
    raw = node.get("widgets_values")
    values: dict[str, Any] = {}
    for index, widget in enumerate(layout):
        if isinstance(raw, dict):
            value = raw.get(widget.name, widget.default)
        elif isinstance(raw, list) and index < len(raw) and raw[index] is not None:
            value = raw[index]
        else:
            value = widget.default
        values[widget.name] = value
    return values


# ----------------------------------------------------------------------------------------------------------


def is_ui_workflow(data: dict) -> bool:
    return isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data


def is_api_prompt(data: dict) -> bool:
    return (
        isinstance(data, dict)
        and bool(data)
        and all(isinstance(v, dict) and "class_type" in v for v in data.values())
    )


@dataclass(frozen=True)
class Link:
    id: int
    origin_id: int | str
    origin_slot: int
    target_id: int | str
    target_slot: int
    type: str


def _links(workflow: dict) -> dict[int, Link]:
    links: dict[int, Link] = {}
    for item in workflow.get("links") or []:
        if isinstance(item, dict):
            link = Link(
                item["id"],
                item["origin_id"],
                int(item["origin_slot"]),
                item["target_id"],
                int(item["target_slot"]),
                item.get("type", "*"),
            )
        else:
            link = Link(
                item[0], item[1], int(item[2]), item[3], int(item[4]), item[5] if len(item) > 5 else "*"
            )
        links[link.id] = link
    return links


def valid_connection(type_a: str | None, type_b: str | None) -> bool:
    """LiteGraph.isValidConnection: '*' and '' match anything; comma lists match on any member."""
    a = "" if type_a in (None, "*") else str(type_a)
    b = "" if type_b in (None, "*") else str(type_b)
    if not a or not b or a == b:
        return True
    a, b = a.lower(), b.lower()
    if "," not in a and "," not in b:
        return a == b
    return bool(set(a.split(",")) & set(b.split(",")))


class _Converter:
    def __init__(self, workflow: dict, object_info: dict):
        if not is_ui_workflow(workflow):
            raise ConversionError("not a UI-format workflow (no 'nodes' and 'links')")
        if (workflow.get("definitions") or {}).get("subgraphs"):
            raise ConversionError("subgraphs are not supported by this converter; unpack them in the editor")
        if (workflow.get("extra") or {}).get("groupNodes"):
            raise ConversionError("legacy group nodes are not supported; convert them to nodes in the editor")
        self.object_info = object_info
        self.nodes = {str(n["id"]): n for n in workflow["nodes"]}
        self.links = _links(workflow)
        missing: dict[str, list] = {}
        for node in workflow["nodes"]:
            if node["type"] not in VIRTUAL_TYPES and node["type"] not in object_info:
                missing.setdefault(node["type"], []).append(node["id"])
        if missing:
            raise MissingNodeTypes(missing)

    # -- the editor's live input list: sockets (as saved), then one input per widget
    def live_inputs(self, node: dict) -> list[dict]:
        saved = node.get("inputs") or []
        if node["type"] in VIRTUAL_TYPES:
            return list(saved)
        sockets = [i for i in saved if not i.get("widget")]
        by_name = {i["name"]: i for i in saved if i.get("widget")}
        node_def = self.object_info[node["type"]]
        specs = {name: spec for name, spec, _ in ordered_inputs(node_def)}
        widget_inputs = []
        for widget in widget_layout(node_def):
            if not widget.serialize and widget.name not in specs:
                continue  # control/filter widgets have no socket
            spec = specs.get(widget.name)
            saved_input = by_name.get(widget.name)
            entry = dict(saved_input) if saved_input else {"name": widget.name, "link": None}
            entry.setdefault("type", input_type(spec) if spec else "*")
            widget_inputs.append(entry)
        return sockets + widget_inputs

    def resolve_input(self, node: dict, slot_input: dict, visited: set, type_: str | None = None):
        """(origin_id, origin_slot) the input reads from, or None (nothing connected)."""
        key = (str(node["id"]), "I", slot_input["name"])
        if key in visited:
            raise ConversionError(f"circular link at node {node['id']} input {slot_input['name']}")
        visited.add(key)
        link_id = slot_input.get("link")
        if link_id is None:
            return None
        link = self.links.get(link_id)
        if link is None:
            raise ConversionError(
                f"node {node['id']} input '{slot_input['name']}' uses missing link {link_id}"
            )
        origin = self.nodes.get(str(link.origin_id))
        if origin is None:
            raise ConversionError(f"link {link_id} starts at missing node {link.origin_id}")
        return self.resolve_output(origin, link.origin_slot, type_ or slot_input.get("type"), visited)

    def resolve_output(self, node: dict, slot: int, type_: str | None, visited: set):
        key = (str(node["id"]), "O", slot)
        if key in visited:
            raise ConversionError(f"circular link at node {node['id']} output {slot}")
        visited.add(key)
        mode = node.get("mode", MODE_ALWAYS)
        if mode == MODE_BYPASS:
            inputs = self.live_inputs(node)
            index = self._bypass_slot(node, inputs, slot, type_)
            if index < 0:
                return None
            return self.resolve_input(node, inputs[index], visited)
        if node["type"] in VIRTUAL_TYPES:
            inputs = node.get("inputs") or []
            if slot < len(inputs):
                return self.resolve_input(node, inputs[slot], visited, type_)
            return None
        return (str(node["id"]), int(slot))

    @staticmethod
    def _bypass_slot(node: dict, inputs: list[dict], slot: int, type_: str | None) -> int:
        outputs = node.get("outputs") or []
        output_type = outputs[slot].get("type") if slot < len(outputs) else None
        if type_ in ("*", "", None):
            return slot if len(inputs) > slot else 0
        if slot < len(inputs):
            opposite = inputs[slot].get("type")
            if valid_connection(opposite, output_type) and valid_connection(opposite, type_):
                return slot
        for index, item in enumerate(inputs):
            if item.get("type") == type_:
                return index
        for index, item in enumerate(inputs):
            if valid_connection(item.get("type"), output_type) and valid_connection(item.get("type"), type_):
                return index
        return -1

    def title(self, node: dict) -> str:
        if node.get("title"):
            return node["title"]
        node_def = self.object_info.get(node["type"]) or {}
        return node_def.get("display_name") or node_def.get("name") or node["type"]

    def primitive_values(self) -> dict[tuple[str, str], Any]:
        """(target node id, input name) → value, for every input a PrimitiveNode feeds."""
        values: dict[tuple[str, str], Any] = {}
        for node in self.nodes.values():
            if node["type"] != "PrimitiveNode":
                continue
            raw = node.get("widgets_values") or []
            if not raw:
                continue
            for output in node.get("outputs") or []:
                for link_id in output.get("links") or []:
                    link = self.links.get(link_id)
                    if link is None:
                        continue
                    target = self.nodes.get(str(link.target_id))
                    if target is None:
                        continue
                    for item in target.get("inputs") or []:
                        if item.get("link") == link_id and item.get("widget"):
                            values[(str(target["id"]), item["widget"]["name"])] = raw[0]
        return values

    def convert(self) -> dict[str, dict]:
        primitives = self.primitive_values()
        output: dict[str, dict] = {}
        for node_id, node in self.nodes.items():
            mode = node.get("mode", MODE_ALWAYS)
            if node["type"] in VIRTUAL_TYPES or mode in (MODE_NEVER, MODE_BYPASS):
                continue
            node_def = self.object_info[node["type"]]
            inputs: dict[str, Any] = {}
            serialized = {w.name for w in widget_layout(node_def) if w.serialize}
            for name, value in widget_values(node, node_def).items():
                if name not in serialized:
                    continue
                value = primitives.get((node_id, name), value)
                inputs[name] = {"__value__": copy.deepcopy(value)} if isinstance(value, list) else value
            for slot_input in self.live_inputs(node):
                resolved = self.resolve_input(node, slot_input, set())
                if resolved is not None:
                    inputs[slot_input["name"]] = [resolved[0], resolved[1]]
            output[node_id] = {
                "inputs": inputs,
                "class_type": node["type"],
                "_meta": {"title": self.title(node)},
            }
        for entry in output.values():
            for name, value in list(entry["inputs"].items()):
                if isinstance(value, list) and len(value) == 2 and value[0] not in output:
                    del entry["inputs"][name]
        return output


def ui_to_api(workflow: dict, object_info: dict) -> dict[str, dict]:
    """Convert a UI-format workflow to an API prompt with the server's ``/object_info``."""
    return _Converter(workflow, object_info).convert()


# ----------------------------------------------------------------------------------------------------------
# Editing prompts and workflows


def parse_value(text: str) -> Any:
    """A command-line value: JSON when it parses (numbers, true/false, lists), else the string itself."""
    import json

    try:
        return json.loads(text)
    except ValueError:
        return text


def find_node(prompt: dict, ref: str) -> str:
    """A node of an API prompt by id, by its unique ``_meta.title``, or by its unique class type."""
    if ref in prompt:
        return ref
    for field in ("title", "class_type"):
        if field == "title":
            matches = [nid for nid, n in prompt.items() if (n.get("_meta") or {}).get("title") == ref]
        else:
            matches = [nid for nid, n in prompt.items() if n.get("class_type") == ref]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise ConversionError(f"'{ref}' names several nodes ({', '.join(matches)}); use the id")
    raise ConversionError(f"no node with id, title or class type '{ref}'")


def set_input(prompt: dict, assignment: str | tuple[str, Any]) -> None:
    """Apply ``node.input=value`` (node: id or title; the last '.' before '=' splits node and input)."""
    if isinstance(assignment, str):
        if "=" not in assignment:
            raise ConversionError(f"expected node.input=value, got '{assignment}'")
        target, text = assignment.split("=", 1)
        value = parse_value(text)
    else:
        target, value = assignment
    if "." not in target:
        raise ConversionError(f"expected node.input=value, got '{target}'")
    ref, name = target.rsplit(".", 1)
    node_id = find_node(prompt, ref)
    prompt[node_id]["inputs"][name] = {"__value__": value} if isinstance(value, list) else value


CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")


def apply_seed_controls(workflow: dict, object_info: dict, rng) -> None:
    """What the editor does after queueing: increment/decrement/randomize each controlled INT widget."""
    for node in workflow.get("nodes") or []:
        node_def = object_info.get(node["type"])
        raw = node.get("widgets_values")
        if node_def is None or not isinstance(raw, list):
            continue
        layout = widget_layout(node_def)
        specs = {name: spec for name, spec, _ in ordered_inputs(node_def)}
        for index, widget in enumerate(layout):
            if widget.serialize or index == 0 or index >= len(raw) or raw[index] not in CONTROL_VALUES:
                continue
            target = layout[index - 1]
            spec = specs.get(target.name)
            if spec is None or input_type(spec) != "INT" or index - 1 >= len(raw):
                continue
            options = _options(spec)
            low, high = options.get("min", 0), options.get("max", 2**53)
            step = options.get("step", 1) or 1
            value = raw[index - 1]
            mode = raw[index]
            if mode == "increment":
                value = min(high, value + step)
            elif mode == "decrement":
                value = max(low, value - step)
            elif mode == "randomize":
                value = rng.randrange(max(low, 0), min(high, 1125899906842624) + 1)
            raw[index - 1] = value
