"""Each input declared once (nodes/host/inputs.py), checked where ComfyUI checks it: over the real server.

For every node and every widget input an invalid value POSTed to /prompt is refused with HTTP 400 and
``node_errors`` naming that node and only the inputs at fault; a property-based fuzz sends malformed values for
every input of every node and accepts only a 400 of that shape, a run with finite output, or an execution
error naming the node.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid

import pytest
from fg_testing.prompts import tiny_txt2img
from fg_testing.server import ComfyServer, prepare_base_dir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.server

# What each node needs around it to run on the tiny models: the family, values that differ from its declared
# defaults (a size the tiny latent has, a mode the family supports) and the sampler's cfg.
SETUP = {
    "FreeGuidanceFouriScale": ("sd15_deep", {"width": 64, "height": 64, "base_resolution": 32}, 4.0),
    "FreeGuidanceDiffuseHigh": ("sd15", {"width": 128, "height": 128, "structure_steps": 2}, 4.0),
    "FreeGuidanceICG": ("sd15", {"mode": "gaussian"}, 4.0),
    "FreeGuidanceSTG": ("sd15", {"mode": "STG-A (skip attention)"}, 4.0),
    "FreeGuidanceCFGppSampler": ("sd15", {}, 0.6),  # the guider's cfg is CFG++'s λ in [0, 1]
    "FreeGuidanceCFGppEuler": ("sd15", {}, 0.6),
    "FreeGuidanceFasterCache": ("sd3", {}, 4.0),  # DiTs only
    "FreeGuidanceFasterCacheFeatureReuse": ("sd3", {}, 4.0),
}
VAE_FILE = "tiny_taesd.safetensors"  # written by prepare_base_dir


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base_dir = prepare_base_dir(tmp_path_factory.mktemp("inputs-server"))
    with ComfyServer(base_dir) as running:
        yield running


@pytest.fixture(scope="module")
def declared(pack):
    """class_type → the node's Inputs declaration, for every node of the pack."""
    out = {name: cls.INPUTS for name, cls in pack.NODE_CLASS_MAPPINGS.items()}
    assert len(out) == len(pack.NODE_CLASS_MAPPINGS) >= 17
    return out


def build(pack, declared, class_type: str, **values) -> tuple[dict, str]:
    """A runnable tiny prompt around ``class_type`` (its defaults, SETUP, then ``values``); returns it and the
    node's id. A value for a link input (model, vae, clip) replaces the link."""
    spec = declared[class_type]
    family, overrides, cfg = SETUP.get(class_type, ("sd15", {}, 4.0))
    inputs = {**spec.defaults(), **overrides, **values}
    found = {}

    def add(g, links):
        for name, link in links.items():
            inputs.setdefault(name, link)
        found["id"] = g.id(g.node(class_type, **inputs))
        return [found["id"], 0]

    returns = pack.NODE_CLASS_MAPPINGS[class_type].RETURN_TYPES
    if class_type == "FreeGuidanceEvaluationReport":
        prompt, ids = tiny_txt2img(family, steps=2, cfg=cfg)
        prompt[ids["report"]]["inputs"].update(values)
        return prompt, ids["report"]
    if returns == ("MODEL",):
        prompt, _ = tiny_txt2img(family, steps=2, cfg=cfg, patch=lambda g, model: add(g, {"model": model}))
    elif returns == ("SAMPLER",):
        prompt, _ = tiny_txt2img(
            family, steps=2, cfg=cfg, sampler_node=lambda g: add(g, link_inputs(g, spec, family))
        )
    elif returns == ("GUIDANCE_OBJECTIVE",):
        # The objective feeds the sampler that uses it (SCG for a non-differentiable rule, else TFG).
        sampler = (
            "FreeGuidanceSCGSampler"
            if class_type == "FreeGuidanceObjectiveImageRule"
            else "FreeGuidanceTFGSampler"
        )

        def sampler_node(g):
            objective = add(g, link_inputs(g, spec, family))
            return g.node(
                sampler, **{**declared[sampler].defaults(), **SMALL.get(sampler, {}), "objective": objective}
            )

        prompt, _ = tiny_txt2img(family, steps=2, cfg=cfg, sampler_node=sampler_node)
    else:
        raise AssertionError(f"{class_type}: no prompt builder for RETURN_TYPES {returns}")
    return prompt, found["id"]


SMALL = {"FreeGuidanceSCGSampler": {"candidates": 2, "chunk": 2}}  # few candidates keep the runs short


def link_inputs(g, spec, family: str) -> dict:
    """Source nodes for the required link inputs a SAMPLER or objective node takes besides the sampler's own."""
    sources = {
        "VAE": lambda: g.node("VAELoader", vae_name=VAE_FILE),
        "IMAGE": lambda: g.node("EmptyImage", width=8, height=8, batch_size=1, color=0),
        "LATENT": lambda: g.node(
            "FGTest_TinyEmptyLatent", family=family, batch=1, height=8, width=8, frames=3
        ),
        "CLIP_VISION": lambda: g.node("FGTest_TinyClipVision", seed=0),
        "GUIDANCE_OBJECTIVE": lambda: g.node(
            "FreeGuidanceObjectiveLatentMeasurement",
            latent=sources["LATENT"](),
            operator="masked (inpainting)",
            factor=2,
            blur_sigma=2.0,
            weight=1.0,
        ),
    }
    return {
        name: sources[i.kind]() for name, i in spec.inputs.items() if i.kind in sources and not i.optional
    }


def invalid_values(spec) -> list[tuple[str, object]]:
    """(what, value) pairs ComfyUI's queue-time validation must refuse for one widget input."""
    if spec.kind == "COMBO":
        return [("not in the list", "no such option"), ("wrong type", 7)]
    if spec.kind not in ("FLOAT", "INT"):
        return []  # BOOLEAN and STRING: ComfyUI coerces any JSON value (bool(), str()); the fuzz covers them
    low = spec.min if spec.sentinel is None else min(spec.min, spec.sentinel)
    cases = [("below min", low - 1), ("above max", spec.max + 1), ("wrong type", "not a number")]
    if spec.kind == "FLOAT":
        cases.append(("NaN", float("nan")))
    if spec.multiple:
        cases.append(("not a multiple", spec.min + 1))
    if spec.sentinel is not None:
        cases.append(("between sentinel and min", (spec.sentinel + spec.min) / 2))
    return cases


def post(server, prompt: dict) -> tuple[int, dict]:
    return server.post("/prompt", {"prompt": prompt})


def error_inputs(answer: dict, node_id: str) -> set[str]:
    return {e.get("extra_info", {}).get("input_name") for e in answer["node_errors"][node_id]["errors"]}


def no_traceback(answer: dict) -> None:
    text = json.dumps(answer)
    assert "Traceback" not in text and "exception_during" not in text, text[:2000]


def test_invalid_widget_values_are_refused_naming_only_the_node_and_input(pack, declared, server):
    checked = 0
    for class_type, spec in declared.items():
        partners = {name: set(rule.inputs) for rule in spec.rules for name in rule.inputs}
        for name in spec.widget_names():
            for what, value in invalid_values(spec[name]):
                prompt, node_id = build(pack, declared, class_type, **{name: value})
                status, answer = post(server, prompt)
                label = f"{class_type}.{name} {what} ({value!r})"
                assert status == 400, label
                no_traceback(answer)
                assert set(answer["node_errors"]) == {node_id}, label
                assert answer["node_errors"][node_id]["class_type"] == class_type
                named = error_inputs(answer, node_id)
                # ComfyUI converts types before VALIDATE_INPUTS runs and names a failed conversion alone; a
                # rule input refused by the rule's VALIDATE_INPUTS is reported against every input of the rule.
                expected = {name} if what == "wrong type" else partners.get(name, {name})
                assert named == expected, f"{label}: named {named}"
                for error in answer["node_errors"][node_id]["errors"]:
                    assert name in error["details"] + error["message"], label
                if what not in ("not in the list", "wrong type"):
                    text = " ".join(
                        e["message"] + e["details"] for e in answer["node_errors"][node_id]["errors"]
                    )
                    assert f"{spec.node}: input '{name}'" in text, f"{label}: {text}"
                checked += 1
    assert checked > 200


def test_cross_input_rules_name_only_their_inputs(pack, declared, server):
    rules = [(c, rule) for c, spec in declared.items() for rule in spec.rules]
    assert {c for c, _ in rules} == {
        "FreeGuidanceCFGInterval",
        "FreeGuidancePAG",
        "FreeGuidanceSEG",
        "FreeGuidanceSTG",
        "FreeGuidanceSAG",
        "FreeGuidanceTSG",
        "FreeGuidanceFouriScale",
        "FreeGuidanceCFGCache",
        "FreeGuidanceFasterCacheFeatureReuse",
        "FreeGuidanceSCFG",
        "FreeGuidanceSCGSampler",
    }
    for class_type, rule in rules:
        spec = declared[class_type]
        low, high = rule.inputs
        values = {low: spec[high].max, high: spec[low].min}
        prompt, node_id = build(pack, declared, class_type, **values)
        status, answer = post(server, prompt)
        assert status == 400, class_type
        no_traceback(answer)
        assert error_inputs(answer, node_id) == {low, high}, class_type
        assert f"{spec.node}: input '{low}' must not exceed {high}" in json.dumps(answer), class_type


def test_every_size_input_has_a_max_enforced_at_queue_time(pack, declared, server):
    sizes = [(c, n) for c, spec in declared.items() for n in ("width", "height") if n in spec.inputs]
    assert len(sizes) == 4
    for class_type, name in sizes:
        for value in (declared[class_type][name].max + 8, 17_384_000, 10**24):
            prompt, node_id = build(pack, declared, class_type, **{name: value})
            status, answer = post(server, prompt)
            assert status == 400 and error_inputs(answer, node_id) == {name}, (class_type, name, value)


# ----------------------------------------------------------------------------------------------------------
# Fuzz: malformed values for every input of every node


def malformed():
    """JSON values a client may send for any input. Two-element lists are links in ComfyUI's prompt format
    and are left out: ComfyUI resolves them before any node code sees them."""
    huge = st.integers(min_value=300, max_value=400).flatmap(lambda k: st.sampled_from([10**k, -(10**k)]))
    text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
    return st.one_of(
        st.integers(min_value=-(2**70), max_value=2**70),
        huge,
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from([float("nan"), float("inf"), -float("inf"), 0, -1, 1e308, -0.0]),
        text,
        st.sampled_from(["0.5", "1e400", "nan", "inf", "16", "", "auto", "true"]),
        st.none(),
        st.booleans(),
        st.lists(st.integers(), max_size=4).filter(lambda v: len(v) != 2),
        st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
        st.builds(lambda v: {"__value__": v}, st.one_of(st.floats(), st.text(max_size=4), st.none())),
    )


def all_inputs(pack):
    return sorted((name, i) for name, cls in pack.NODE_CLASS_MAPPINGS.items() for i in cls.INPUTS.inputs)


def submit(server, prompt: dict, timeout: float = 180) -> tuple[int, dict, dict | None]:
    """POST; for an accepted prompt, follow /ws to its end: (status, answer, final event or None)."""
    import websocket

    client_id = str(uuid.uuid4())
    ws = websocket.create_connection(f"ws://127.0.0.1:{server.port}/ws?clientId={client_id}", timeout=timeout)
    try:
        status, answer = server.post("/prompt", {"prompt": prompt, "client_id": client_id})
        if status != 200:
            return status, answer, None
        deadline = time.time() + timeout
        while time.time() < deadline:
            message = ws.recv()
            if not isinstance(message, str):
                continue
            event = json.loads(message)
            if event.get("data", {}).get("prompt_id") != answer["prompt_id"]:
                continue
            if event["type"] in ("execution_error", "execution_success"):
                return status, answer, event
        raise TimeoutError(f"prompt {answer['prompt_id']} did not finish in {timeout}s")
    finally:
        ws.close()


def history_entry(server, prompt_id: str, timeout: float = 30) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        history = server.get(f"/history/{prompt_id}")
        if prompt_id in history:
            return history[prompt_id]
        time.sleep(0.05)
    raise TimeoutError(prompt_id)


def test_fuzz_malformed_values_for_every_input_of_every_node(pack, declared, server):
    targets = all_inputs(pack)
    outcomes = {"refused": 0, "ran": 0, "execution error": 0}

    @settings(
        max_examples=100,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(target=st.sampled_from(targets), value=malformed())
    def one(target, value):
        class_type, name = target
        prompt, node_id = build(pack, declared, class_type, **{name: value})
        label = f"{class_type}.{name} = {value!r}"
        status, answer, event = submit(server, prompt)
        assert status < 500, label
        if status == 400:
            no_traceback(answer)
            errors = answer["node_errors"]
            assert set(errors) == {node_id}, f"{label}: {errors}"
            assert name in error_inputs(answer, node_id), f"{label}: {errors}"
            outcomes["refused"] += 1
        else:
            assert status == 200, label
            data = event["data"]
            if event["type"] == "execution_error":
                named = (
                    data.get("node_id") == node_id or declared[class_type].node in data["exception_message"]
                )
                assert named, f"{label}: {data.get('node_type')} {data['exception_message']}"
                outcomes["execution error"] += 1
            else:
                entry = history_entry(server, answer["prompt_id"])
                stats = [o["latent_stats"][0] for o in entry["outputs"].values() if "latent_stats" in o]
                assert stats and all(s["finite"] for s in stats), f"{label}: {stats}"
                outcomes["ran"] += 1
        assert server.get("/system_stats", timeout=10)  # the server is alive

    one()
    assert all(outcomes.values()), outcomes  # the fuzz reached all three outcomes


def test_nan_and_huge_numbers_through_the_apply_check_name_the_input(declared):
    for spec in declared.values():
        for name in spec.widget_names():
            kind = spec[name].kind
            for value in (
                (float("nan"), 10**400, "0.5", [1], None, True) if kind in ("FLOAT", "INT") else ([1], None)
            ):
                if kind == "BOOLEAN" and isinstance(value, bool):
                    continue
                with pytest.raises(ValueError, match=re.escape(f"{spec.node}: input '{name}'")):
                    spec.check(**{name: value})


def test_declared_defaults_pass_the_apply_check(declared):
    for spec in declared.values():
        values = spec.defaults()
        assert spec.check(**values).keys() == values.keys()
        assert all(not isinstance(v, float) or math.isfinite(v) for v in values.values())
