"""The block-string parser: which attention blocks of a model a node's ``blocks`` input names."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .. import toolkit
from .families import ModelLayout


@dataclass(frozen=True)
class Selection:
    layout: ModelLayout
    keys: tuple  # unet: ("middle", 0, t) ...; dit: ("double_block", i) ...

    def describe(self) -> str:
        return ", ".join(".".join(str(p) for p in key) for key in self.keys)


_UNET_ITEM = re.compile(r"^(input|middle|output)(?:\.(\d+))?(?:\.(\d+))?$")
_DIT_GROUP = re.compile(r"^(?:(double|single)\s*:)?\s*([\d\s,\-]+)$")


def _unet_syntax_error(node, input_name, item, layout):
    return toolkit.GuidanceInputError(
        node,
        input_name,
        f"has '{item}', which is not a UNet block; write items like 'middle', 'output.1', 'input.4.2' "
        f"(part.block[.transformer]) separated by commas, or 'auto'. This model has: {layout.describe_blocks()}",
    )


def _parse_unet(node, input_name, text, layout) -> tuple:
    keys: list = []
    for raw in text.split(","):
        item = raw.strip().lower()
        if not item:
            continue
        match = _UNET_ITEM.match(item)
        if not match:
            raise _unet_syntax_error(node, input_name, item, layout)
        part, index, transformer = match.group(1), match.group(2), match.group(3)
        if part == "middle":
            index = 0 if index is None else int(index)
        elif index is None:
            raise _unet_syntax_error(node, input_name, item, layout)
        else:
            index = int(index)
        depth = layout.blocks.get((part, index))
        if depth is None:
            raise toolkit.GuidanceInputError(
                node,
                input_name,
                f"has '{item}', a block without self-attention or not in this model; "
                f"blocks with attention: {layout.describe_blocks()}",
            )
        if transformer is None:
            chosen = range(depth)
        else:
            t = int(transformer)
            if t >= depth:
                raise toolkit.GuidanceInputError(
                    node,
                    input_name,
                    f"has '{item}', but {part}.{index} has transformer blocks 0-{depth - 1} only",
                )
            chosen = [t]
        for t in chosen:
            if (part, index, t) not in keys:
                keys.append((part, index, t))
    return tuple(keys)


def _parse_indices(node, input_name, text: str, kind: str, count: int, group: str) -> list[int]:
    indices: list[int] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        if "-" in item:
            low, _, high = item.partition("-")
            if not low.strip().isdigit() or not high.strip().isdigit() or int(low) > int(high):
                raise toolkit.GuidanceInputError(node, input_name, f"has a bad range '{item}' in '{group}'")
            values = range(int(low), int(high) + 1)
        elif item.isdigit():
            values = [int(item)]
        else:
            raise toolkit.GuidanceInputError(
                node, input_name, f"has '{item}', not a block index, in '{group}'"
            )
        for value in values:
            if value >= count:
                valid = f"0-{count - 1}" if count else "none"
                raise toolkit.GuidanceInputError(
                    node,
                    input_name,
                    f"has {kind} block {value}, but this model's {kind} blocks are {valid}",
                )
            if value not in indices:
                indices.append(value)
    return indices


def _parse_dit(node, input_name, text, layout) -> tuple:
    keys: list = []
    for group in re.split(r"[;\n]", text):
        group = group.strip().lower()
        if not group:
            continue
        match = _DIT_GROUP.match(group)
        if not match:
            raise toolkit.GuidanceInputError(
                node,
                input_name,
                f"has '{group}'; write DiT blocks as 'double:7,8,9; single:0-3' (a bare list means double "
                f"blocks) or 'auto'. This model has: {layout.describe_blocks()}",
            )
        kind = match.group(1) or "double"
        count = layout.blocks.get(kind, 0)
        for index in _parse_indices(node, input_name, match.group(2), kind, count, group):
            key = (f"{kind}_block", index)
            if key not in keys:
                keys.append(key)
    return tuple(keys)


def _default_blocks(layout: ModelLayout) -> str:
    """The family default; on a model shallower than the reference, the same relative depth."""
    spec = layout.spec
    if spec.kind == "unet":
        return spec.default_blocks
    groups = []
    for group in spec.default_blocks.split(";"):
        kind, _, numbers = group.strip().rpartition(":")
        kind = kind or "double"
        count = layout.blocks.get(kind, 0)
        if count == 0:
            continue
        indices = [int(n) for n in numbers.split(",")]
        if max(indices) >= count:
            reference = spec.reference_depth.get(kind, count)
            indices = sorted({min(count - 1, i * count // reference) for i in indices})
        groups.append(f"{kind}:{','.join(str(i) for i in indices)}")
    return "; ".join(groups)


def parse_blocks(node: str, input_name: str, text: str, layout: ModelLayout) -> Selection:
    """Validate a block string against the model; 'auto' (or empty) is the family default."""
    if not isinstance(text, str):
        raise toolkit.GuidanceInputError(node, input_name, f"must be a string, got {text!r}")
    stripped = text.strip()
    if stripped.lower() in ("", "auto"):
        stripped = _default_blocks(layout)
    parse = _parse_unet if layout.spec.kind == "unet" else _parse_dit
    keys = parse(node, input_name, stripped, layout)
    if not keys:
        raise toolkit.GuidanceInputError(
            node, input_name, f"selects no block (this model has: {layout.describe_blocks()})"
        )
    return Selection(layout, keys)
