"""UI-format workflow (what the ComfyUI editor saves) → API prompt (what the server executes).

ComfyUI has no Python converter; the editor converts in JavaScript (``graphToPrompt`` in the frontend). This
module follows the rules of the pinned frontend (``comfyui-frontend-package`` 1.27.10) and of the newest
(1.58.1), and is tested for parity with both in a real browser (tests/test_workflows.py):

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
- subgraphs are flattened like the editor's ExecutableNodeDTO: an inner node's id is the path of subgraph
  instances (``"15:8"``), links pass through the subgraph's input and output nodes, an unlinked instance input
  sends the instance's promoted widget value, muted/bypassed instances behave as nodes of those modes
  (1.27 still sends the nodes inside them; the newer editors do not);
- widgets that exist only in the frontend (3D viewers and their buttons, audio UI, webcam, remote combos)
  are laid out as the editor's own extensions add them and sent as it sends them;
- node types the server lacks are an error only where the node would run (bypassed/muted ones are dropped);
- groups are drawing only; legacy group nodes are not supported (a clear error);
- every node gets ``_meta.title``: its own title, else the node definition's display name.

Where the pinned editor (1.27.10) and the newer ones differ, ``ui_to_api(..., frontend=VERSION)`` picks the
rules (default: the version that saved the workflow, ``extra.frontendVersion``, else the newest).

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
    serialize: bool  # False: control/filter/upload widgets, never sent
    default: Any = None
    stored: bool = True  # has a position in widgets_values (the editor's configure skips the others)


# Widgets that exist only in the frontend, added by the editor's own extensions (3D viewers, audio UI, webcam,
# remote combos). Read off the editor for every node type the server has; test_workflows.py checks the
# layout against the editor's on each frontend. (name, value; sent in the prompt as the editor sends them)
LOAD_3D_TYPES = frozenset({"LOAD_3D", "LOAD_3D_ANIMATION"})  # 1.27; the newest draws only LOAD_3D
LOAD_3D_BUTTONS = (
    ("upload 3d model", "upload3dmodel"),
    ("upload extra resources", "uploadExtraResources"),
    ("clear", "clear"),
)
VIEWER_3D_NODES = frozenset({"Preview3D", "SaveGLB"})  # + an "image" (viewer) widget; 1.27 also:
VIEWER_3D_NODES_1_27 = VIEWER_3D_NODES | {"Preview3DAnimation"}
WEBCAM_BUTTON = ("waiting for camera...", "capture")
AUDIO_OUTPUT_NODES = frozenset({"PreviewAudio", "SaveAudio", "SaveAudioMP3", "SaveAudioOpus"})  # + "audioUI"
PREVIEW_ANY_NODES = frozenset(
    {"PreviewAny"}
)  # + a "preview" text widget (the newest: text and mode, not sent)


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


def widget_layout(node_def: dict, newest: bool = True) -> list[Widget]:
    """The node's widgets in creation order (those of the frontend's own extensions included).

    ``newest``: the rules of the newer editors (1.28 on) where they differ from the pinned 1.27.
    """
    widgets: list[Widget] = []
    ordered = ordered_inputs(node_def)
    load_3d = {"LOAD_3D"} if newest else LOAD_3D_TYPES
    has_3d = any(input_type(spec) in load_3d for _, spec, _ in ordered)
    webcam = False
    for name, spec, optional in ordered:
        options = _options(spec)
        if optional and options.get("defaultInput"):
            continue  # migrated to forceInput by the editor
        kind = input_type(spec)
        if kind in load_3d:
            widgets.append(Widget(name, serialize=True, default=""))
            continue
        if kind == "AUDIO_RECORD":  # the recorder and its record button
            button = f"{name}#1" if newest else name
            widgets += [Widget(name, serialize=True, default=""), Widget(button, serialize=False, default="")]
            continue
        if kind == "WEBCAM":
            widgets.append(Widget(name, serialize=True, default=""))
            webcam = True
            continue
        if not is_widget_input(spec):
            continue
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
        elif kind == "COMBO":
            if control:
                widgets.append(Widget(_control_name(options), serialize=False, default="randomize"))
                widgets.append(Widget("control_filter_list", serialize=False, default=""))
            remote = options.get("remote") if isinstance(options.get("remote"), dict) else {}
            if remote.get("refresh_button"):
                widgets.append(Widget("Auto-refresh after generation", serialize=False, default=False))
                widgets.append(Widget("refresh", serialize=True, default="refresh"))
            if options.get("audio_upload"):
                widgets.append(Widget("audioUI", serialize=not newest, default="", stored=False))
                widgets.append(Widget("upload", serialize=False, default=""))
            if options.get("file_upload") and has_3d:
                widgets += [Widget(label, serialize=True, default=value) for label, value in LOAD_3D_BUTTONS]
    if webcam:
        widgets.append(Widget(WEBCAM_BUTTON[0], serialize=True, default=WEBCAM_BUTTON[1]))
    name = node_def.get("name")
    if name in (VIEWER_3D_NODES if newest else VIEWER_3D_NODES_1_27):
        widgets.append(Widget("image", serialize=True, default=""))
    if name in AUDIO_OUTPUT_NODES:
        widgets.append(Widget("audioUI", serialize=not newest, default="", stored=False))
    if name in PREVIEW_ANY_NODES and newest:
        widgets.append(Widget("preview_text", serialize=False, default="", stored=False))
        widgets.append(Widget("preview_mode", serialize=False, default="", stored=False))
    elif name in PREVIEW_ANY_NODES:
        widgets.append(Widget("preview", serialize=True, default="", stored=False))
    return widgets


def _control_name(options: dict) -> str:
    value = options.get("control_after_generate")
    if isinstance(value, str):
        return value
    if options.get("control_prefix"):
        return f"{options['control_prefix']} control_after_generate"
    return "control_after_generate"


def widget_values(node: dict, node_def: dict, newest: bool = True) -> dict[str, Any]:
    """``{widget name: value}`` for every widget of a UI node (defaults where widgets_values is short)."""
    raw = node.get("widgets_values")
    values: dict[str, Any] = {}
    index = -1
    for widget in widget_layout(node_def, newest):
        if not widget.stored:
            values[widget.name] = widget.default
            continue
        index += 1
        if widget.name in values and not widget.serialize:
            continue  # a second widget of that name (RecordAudio's button): the first one is sent
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


SUBGRAPH_INPUT_ID = -10  # the subgraph's input node inside a definition
SUBGRAPH_OUTPUT_ID = -20


class _Scope:
    """One graph: the root workflow or a subgraph definition (its node ids and link ids are its own)."""

    def __init__(self, data: dict, definition: dict | None = None):
        self.definition = definition
        self.nodes = {str(n["id"]): n for n in data.get("nodes") or []}
        self.links = _links(data)


class _Dto:
    """A node as the editor flattens it (ExecutableNodeDTO): its id is the path of subgraph instances."""

    def __init__(self, node: dict, path: tuple[str, ...], scope: _Scope, parent: _Dto | None):
        self.node = node
        self.path = path
        self.scope = scope
        self.parent = parent  # the subgraph instance this node sits in
        self.id = ":".join((*path, str(node["id"])))

    @property
    def mode(self) -> int:
        return self.node.get("mode", MODE_ALWAYS)


class _Converter:
    def __init__(self, workflow: dict, object_info: dict, frontend: str | None = None):
        if not is_ui_workflow(workflow):
            raise ConversionError("not a UI-format workflow (no 'nodes' and 'links')")
        if (workflow.get("extra") or {}).get("groupNodes"):
            raise ConversionError("legacy group nodes are not supported; convert them to nodes in the editor")
        self.object_info = object_info
        self.newest = frontend_rules(frontend or (workflow.get("extra") or {}).get("frontendVersion"))
        self.definitions: dict[str, dict] = {}
        self._collect_definitions(workflow)
        self.scopes: dict[str, _Scope] = {sid: _Scope(d, d) for sid, d in self.definitions.items()}
        self.root = _Scope(workflow)
        self.dtos: dict[str, _Dto] = {}
        for node in workflow["nodes"]:
            dto = self._add(node, (), self.root, None)
            # 1.27 expands every instance; later editors leave out what a muted/bypassed instance holds
            if self.is_subgraph(node) and not (self.newest and dto.mode in (MODE_NEVER, MODE_BYPASS)):
                self._add_inner(dto, set())
        missing: dict[str, list] = {}
        for dto in self.dtos.values():
            if self.executes(dto) and dto.node["type"] not in object_info:
                missing.setdefault(dto.node["type"], []).append(dto.id)
        if missing:
            raise MissingNodeTypes(missing)

    def _collect_definitions(self, data: dict) -> None:
        for definition in (data.get("definitions") or {}).get("subgraphs") or []:
            self.definitions[str(definition["id"])] = definition
            self._collect_definitions(definition)

    def is_subgraph(self, node: dict) -> bool:
        return str(node.get("type")) in self.definitions

    def _add(self, node: dict, path: tuple[str, ...], scope: _Scope, parent: _Dto | None) -> _Dto:
        dto = _Dto(node, path, scope, parent)
        self.dtos[dto.id] = dto
        return dto

    def _add_inner(self, instance: _Dto, visiting: set[str]) -> None:
        """SubgraphNode.getInnerNodes: every node of the definition, nested instances expanded whatever their mode."""
        definition_id = str(instance.node["type"])
        if definition_id in visiting:
            raise ConversionError(
                f"subgraph node {instance.id} contains itself (circular subgraph definitions)"
            )
        scope = self.scopes[definition_id]
        path = (*instance.path, str(instance.node["id"]))
        for node in scope.nodes.values():
            dto = self._add(node, path, scope, instance)
            if self.is_subgraph(node):
                self._add_inner(dto, visiting | {definition_id})

    def executes(self, dto: _Dto) -> bool:
        node = dto.node
        return not (
            node["type"] in VIRTUAL_TYPES or self.is_subgraph(node) or dto.mode in (MODE_NEVER, MODE_BYPASS)
        )

    def dto_in(self, scope_owner: _Dto, node_id) -> _Dto:
        """The node ``node_id`` of the graph ``scope_owner`` sits in."""
        key = ":".join((*scope_owner.path, str(node_id)))
        dto = self.dtos.get(key)
        if dto is None:
            raise ConversionError(f"a link of node {scope_owner.id} starts at missing node {node_id}")
        return dto

    # -- the editor's live input list: sockets (as saved), then one input per widget
    def live_inputs(self, node: dict) -> list[dict]:
        saved = node.get("inputs") or []
        if self.is_subgraph(node):
            # the instance's inputs are the definition's, overlaid position by position with the saved ones
            slots = self.definitions[str(node["type"])].get("inputs") or []
            inputs = [{"name": i.get("name"), "type": i.get("type"), "link": None} for i in slots]
            for index, item in enumerate(saved):
                if index < len(inputs):
                    inputs[index] = {**inputs[index], **item}
                else:
                    inputs.append(dict(item))
            return inputs
        if node["type"] in VIRTUAL_TYPES or node["type"] not in self.object_info:
            return list(saved)
        sockets = [i for i in saved if not i.get("widget")]
        by_name = {i["name"]: i for i in saved if i.get("widget")}
        node_def = self.object_info[node["type"]]
        specs = {name: spec for name, spec, _ in ordered_inputs(node_def)}
        widget_inputs = []
        seen: set[str] = set()
        for widget in widget_layout(node_def, self.newest):
            if widget.name not in specs or widget.name in seen:
                continue  # control/filter widgets and buttons have no socket
            seen.add(widget.name)
            spec = specs.get(widget.name)
            saved_input = by_name.get(widget.name)
            entry = dict(saved_input) if saved_input else {"name": widget.name, "link": None}
            entry.setdefault("type", input_type(spec) if spec else "*")
            widget_inputs.append(entry)
        return sockets + widget_inputs

    # -- link resolution (ExecutableNodeDTO.resolveInput / resolveOutput)
    def resolve_input(self, dto: _Dto, inputs: list[dict], index: int, visited: set, type_=None):
        """("link", origin id, slot) | ("widget", value) | None (nothing connected)."""
        key = (dto.id, "I", index)
        if key in visited:
            raise ConversionError(f"circular link at node {dto.id} input {index}")
        visited.add(key)
        if index >= len(inputs):
            raise ConversionError(f"node {dto.id} has no input slot {index}")
        slot_input = inputs[index]
        link_id = slot_input.get("link")
        if link_id is None:
            return None
        link = dto.scope.links.get(link_id)
        if link is None:
            raise ConversionError(
                f"node {dto.id} input '{slot_input.get('name')}' uses missing link {link_id}"
            )
        if dto.parent is not None and link.origin_id == SUBGRAPH_INPUT_ID:
            return self._through_subgraph_input(dto.parent, link.origin_slot, visited)
        origin = self.dto_in(dto, link.origin_id)
        return self.resolve_output(origin, link.origin_slot, type_ or slot_input.get("type"), visited)

    def _through_subgraph_input(self, instance: _Dto, slot: int, visited: set):
        inputs = self.live_inputs(instance.node)
        if slot >= len(inputs):
            raise ConversionError(f"subgraph node {instance.id} has no input slot {slot}")
        if inputs[slot].get("link") is None:
            found, value = self.promoted_value(instance, slot)
            return ("widget", value) if found else None
        return self.resolve_input(instance, inputs, slot, visited)

    def resolve_output(self, dto: _Dto, slot: int, type_: str | None, visited: set):
        key = (dto.id, "O", slot)
        if key in visited:
            raise ConversionError(f"circular link at node {dto.id} output {slot}")
        visited.add(key)
        node = dto.node
        if dto.mode == MODE_NEVER and self.newest:
            return None
        if dto.mode == MODE_BYPASS:
            inputs = self.live_inputs(node)
            index = self._bypass_slot(node, inputs, slot, type_)
            if index < 0:
                return None
            return self.resolve_input(dto, inputs, index, visited)
        if self.is_subgraph(node):
            outputs = (self.definitions[str(node["type"])].get("outputs")) or []
            if slot >= len(outputs) or not outputs[slot].get("linkIds"):
                return None
            scope = self.scopes[str(node["type"])]
            link = scope.links.get(outputs[slot]["linkIds"][0])
            if link is None:
                return None
            inner = self.dtos.get(":".join((*dto.path, str(node["id"]), str(link.origin_id))))
            if inner is None:
                raise ConversionError(f"subgraph node {dto.id}: output {slot} starts at a missing node")
            return self.resolve_output(inner, link.origin_slot, type_, visited)
        if node["type"] in VIRTUAL_TYPES:
            inputs = node.get("inputs") or []
            if slot < len(inputs):
                return self.resolve_input(dto, inputs, slot, visited, type_)
            return None
        return ("link", dto.id, int(slot))

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

    # -- widget values, promoted widgets of subgraph instances
    def promoted_inputs(self, definition_id: str) -> list[int]:
        """Indices of the definition's inputs the editor makes a widget of on each instance, in widget order."""
        definition = self.definitions[definition_id]
        scope = self.scopes[definition_id]
        promoted = []
        for index, item in enumerate(definition.get("inputs") or []):
            if self._inner_widget(scope, item) is not None:
                promoted.append(index)
        return promoted

    def _inner_widget(self, scope: _Scope, item: dict):
        """(inner node, widget name) of the first inner widget input a subgraph input feeds, or None."""
        for link_id in item.get("linkIds") or []:
            link = scope.links.get(link_id)
            if link is None:
                continue
            target = scope.nodes.get(str(link.target_id))
            if target is None:
                continue
            # saved inputs omit unlinked widget inputs: find the input by its link, not by target_slot
            for item_input in target.get("inputs") or []:
                if item_input.get("link") == link_id and item_input.get("widget"):
                    return target, item_input["widget"]["name"]
        return None

    def promoted_value(self, instance: _Dto, slot: int) -> tuple[bool, Any]:
        """The value of the instance's promoted widget for its input ``slot`` (False: no such widget)."""
        definition_id = str(instance.node["type"])
        definition = self.definitions[definition_id]
        promoted = self.promoted_inputs(definition_id)
        if slot not in promoted:
            return False, None
        raw = instance.node.get("widgets_values")
        position = promoted.index(slot)
        if isinstance(raw, list) and position < len(raw):
            return True, raw[position]
        target, name = self._inner_widget(self.scopes[definition_id], definition["inputs"][slot])
        return True, self.widget_value(target, name, instance)

    def widget_value(self, node: dict, name: str, instance: _Dto) -> Any:
        """The value of widget ``name`` of ``node``, a node of the definition ``instance`` is an instance of."""
        if self.is_subgraph(node):  # a nested instance: its own promoted widget
            dto = self.dtos.get(":".join((*instance.path, str(instance.node["id"]), str(node["id"]))))
            for index, item in enumerate(node.get("inputs") or []):
                if dto is not None and item.get("name") == name:
                    return self.promoted_value(dto, index)[1]
            return None
        if node["type"] not in self.object_info:
            return None
        return widget_values(node, self.object_info[node["type"]], self.newest).get(name)

    def title(self, node: dict) -> str:
        if node.get("title"):
            return node["title"]
        node_def = self.object_info.get(node["type"]) or {}
        return node_def.get("display_name") or node_def.get("name") or node["type"]

    def primitive_values(self) -> dict[tuple[str, str], Any]:
        """(target node id, input name) → value, for every input a PrimitiveNode feeds (in any graph)."""
        values: dict[tuple[str, str], Any] = {}
        for dto in self.dtos.values():
            node = dto.node
            if node["type"] != "PrimitiveNode":
                continue
            raw = node.get("widgets_values") or []
            if not raw:
                continue
            for output in node.get("outputs") or []:
                for link_id in output.get("links") or []:
                    link = dto.scope.links.get(link_id)
                    if link is None:
                        continue
                    target = dto.scope.nodes.get(str(link.target_id))
                    if target is None:
                        continue
                    for item in target.get("inputs") or []:
                        if item.get("link") == link_id and item.get("widget"):
                            target_id = ":".join((*dto.path, str(target["id"])))
                            values[(target_id, item["widget"]["name"])] = raw[0]
        return values

    def convert(self) -> dict[str, dict]:
        primitives = self.primitive_values()
        output: dict[str, dict] = {}
        for dto in self.dtos.values():
            if not self.executes(dto):
                continue
            node = dto.node
            node_def = self.object_info[node["type"]]
            inputs: dict[str, Any] = {}
            serialized = {w.name for w in widget_layout(node_def, self.newest) if w.serialize}
            for name, value in widget_values(node, node_def, self.newest).items():
                if name not in serialized:
                    continue
                value = primitives.get((dto.id, name), value)
                inputs[name] = _wrap(value)
            live = self.live_inputs(node)
            for index, slot_input in enumerate(live):
                resolved = self.resolve_input(dto, live, index, set())
                if resolved is None:
                    continue
                if resolved[0] == "widget":
                    inputs[slot_input["name"]] = _wrap(resolved[1])
                else:
                    inputs[slot_input["name"]] = [resolved[1], resolved[2]]
            output[dto.id] = {
                "inputs": inputs,
                "class_type": node["type"],
                "_meta": {"title": self.title(node)},
            }
        for entry in output.values():
            for name, value in list(entry["inputs"].items()):
                if isinstance(value, list) and len(value) == 2 and value[0] not in output:
                    del entry["inputs"][name]
        return output


def _wrap(value: Any) -> Any:
    return {"__value__": copy.deepcopy(value)} if isinstance(value, list) else value


def frontend_rules(version: str | None) -> bool:
    """True for the rules of the newer editors (1.28 on), False for the pinned 1.27 ones; newest if unknown."""
    if not version:
        return True
    try:
        major, minor = (int(part) for part in str(version).split(".")[:2])
    except ValueError:
        return True
    return (major, minor) >= (1, 28)


def ui_to_api(workflow: dict, object_info: dict, frontend: str | None = None) -> dict[str, dict]:
    """Convert a UI-format workflow to an API prompt with the server's ``/object_info``.

    ``frontend``: the editor version whose rules to follow where versions differ (default: the one that saved
    the workflow, ``extra.frontendVersion``, else the newest).
    """
    return _Converter(workflow, object_info, frontend).convert()


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
    """A node of an API prompt by id, by its unique ``_meta.title``, or by its unique class type.

    Inside a subgraph the id is the editor's path (``"15:8"``: node 8 of subgraph node 15); ``"15:KSampler"``
    names the node of that title or class type directly inside subgraph node 15.
    """
    if ref in prompt:
        return ref
    scope = dict(prompt)
    if ":" in ref:
        prefix, ref = ref.rsplit(":", 1)
        scope = {
            nid: n
            for nid, n in prompt.items()
            if nid.startswith(prefix + ":") and ":" not in nid[len(prefix) + 1 :]
        }
        if not scope:
            raise ConversionError(f"no subgraph node '{prefix}' (node ids inside subgraphs look like 15:8)")
    for field in ("title", "class_type"):
        if field == "title":
            matches = [nid for nid, n in scope.items() if (n.get("_meta") or {}).get("title") == ref]
        else:
            matches = [nid for nid, n in scope.items() if n.get("class_type") == ref]
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
    nodes = list(workflow.get("nodes") or [])
    for definition in (workflow.get("definitions") or {}).get("subgraphs") or []:
        nodes += definition.get("nodes") or []
    for node in nodes:
        node_def = object_info.get(node["type"])
        raw = node.get("widgets_values")
        if node_def is None or not isinstance(raw, list):
            continue
        layout = [w for w in widget_layout(node_def) if w.stored]
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
