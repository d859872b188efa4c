"""The host layer's contracts with the rest of the pack: node modules register no hook of their own, the
package's ``__init__`` is a docstring, the one time model and window."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACK = Path(__file__).resolve().parents[1]
# ComfyUI's hook-registration API (ModelPatcher methods and comfy.model_patcher helpers)
REGISTRATION = {
    "add_wrapper",
    "add_wrapper_with_key",
    "add_callback",
    "add_callback_with_key",
    "add_object_patch",
    "set_attachments",
    "set_injections",
    "add_hook_patches",
    "add_patches",
}


def registration_calls(source: str) -> list[str]:
    found = []
    tree = ast.parse(source)
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            receiver = func.value if isinstance(func, ast.Attribute) else None
            via_host = isinstance(receiver, ast.Name) and receiver.id in {"passes", "steps"}
            if not via_host and (
                name in REGISTRATION or name.startswith(("set_model_", "set_model_options_"))
            ):
                found.append(f"line {node.lineno}: {name}")
        if isinstance(node, ast.Constant) and node.value == "patches_replace" and id(node) not in docstrings:
            found.append(f"line {node.lineno}: 'patches_replace'")
    return found


@pytest.mark.parametrize("module", sorted(p.name for p in (PACK / "nodes").glob("*.py")))
def test_node_modules_register_no_hook_of_their_own(module):
    assert registration_calls((PACK / "nodes" / module).read_text()) == []


def test_the_check_sees_a_registration():
    source = 'def f(m):\n    """patches_replace in a docstring is fine"""\n    m.set_model_attn1_patch(p)\n'
    source += "    m.add_wrapper_with_key(k, key, w)\n    x = o['transformer_options']['patches_replace']\n"
    assert registration_calls(source) == [
        "line 3: set_model_attn1_patch",
        "line 4: add_wrapper_with_key",
        "line 5: 'patches_replace'",
    ]


def test_host_package_init_is_a_docstring():
    tree = ast.parse((PACK / "nodes" / "host" / "__init__.py").read_text())
    assert len(tree.body) == 1 and isinstance(tree.body[0].value, ast.Constant)


def test_one_step_context_and_one_window(pack):
    """StepContext: the index of the step whose interval holds sigma (an intermediate evaluation counts as its
    step), the next sigma only on the grid, t = 1000 (1 - percent); Window: closed, with the one tolerance."""
    from fg_testing import sampling
    from fg_testing.test_nodes import cached_model

    steps = pack.nodes.host.steps
    model = cached_model("sd15")
    ms = model.get_model_object("model_sampling")
    sigmas = sampling.sigmas_for(model, 4)
    values = tuple(float(s) for s in sigmas)
    options = {"transformer_options": {"sample_sigmas": sigmas}}
    for i in range(4):
        step = steps.StepContext.of(options, sigmas[i : i + 1], ms)
        assert (step.index, step.steps, step.on_grid, step.next_sigma) == (i, 4, True, values[i + 1])
    middle = steps.StepContext(0.5 * (values[1] + values[2]), values, ms)
    assert (middle.index, middle.on_grid, middle.next_sigma) == (1, False, None)
    assert steps.StepContext(values[2], values, ms).t == pytest.approx(
        1000 * (1 - steps.sigma_to_percent(ms, values[2]))
    )
    window = steps.Window(0.25, 0.75)
    start, end = window.bounds(ms)
    assert window.contains(steps.StepContext(start, values, ms)) and window.contains(
        steps.StepContext(end, values, ms)
    )
    assert window.contains(steps.StepContext(start * (1 + 0.5 * steps.TOLERANCE), values, ms))
    assert not window.contains(steps.StepContext(start * (1 + 2 * steps.TOLERANCE), values, ms))
    assert not window.contains(steps.StepContext(end * (1 - 2 * steps.TOLERANCE), values, ms))
    assert steps.Window.from_t(250.0, 750.0) == steps.Window(0.25, 0.75)
    assert steps.Window().contains(steps.StepContext(values[0], values, ms))
