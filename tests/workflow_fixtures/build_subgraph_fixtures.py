"""Build the subgraph fixtures IN the real editor: load a template, select nodes, run the editor's own
"Convert Selection to Subgraph" command, promote widgets, bypass/mute, and save what the editor saves.

    $PY tests/workflow_fixtures/build_subgraph_fixtures.py [--frontend 1.27.10|1.58.1] [--out DIR]

The files are committed (subgraph_*.json); test_workflows.py checks the converter against the editor's own
graphToPrompt on them, on every frontend. Rerun this only to change a fixture.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from fg_testing import browser, frontends, template_models  # noqa: E402
from fg_testing.browser import Editor  # noqa: E402
from fg_testing.server import ComfyServer  # noqa: E402

TEMPLATE = HERE.parents[1] / "workflows" / "sd15_txt2img_ag_pag.json"

# Helpers every recipe may use, evaluated in the page before the recipe.
_HELPERS = """
const g = app.graph;
const byType = (t, graph = g) => graph.nodes.find((n) => n.type === t);
const run = (name) => app.extensionManager.command.execute(name);
const convert = async (nodes, graph = g) => {
  const before = new Set(graph.nodes.map((n) => n.id));
  app.canvas.deselectAll();
  for (const n of nodes) app.canvas.select(n);
  await run("Comfy.Graph.ConvertToSubgraph");
  return graph.nodes.find((n) => !before.has(n.id) && n.isSubgraphNode?.());
};
const expose = (subgraphNode, node, inputName) => {
  // a new subgraph input wired to an inner widget input: the editor promotes the widget on the instance
  const subgraph = subgraphNode.subgraph;
  const slot = node.inputs.find((i) => i.name === inputName);
  const input = subgraph.addInput(inputName, String(slot.type));
  input.connect(slot, node);
  return subgraphNode.widgets?.find((w) => w.name === inputName);
};
"""

RECIPES = {
    # AG → PAG → KSampler in one subgraph; the seed and PAG's scale promoted to the instance, seed set there
    "subgraph_promoted": """
      const inst = await convert([byType("FreeGuidanceAdaptiveGuidance"), byType("FreeGuidancePAG"),
                                  byType("KSampler")]);
      inst.title = "Guided sampler";
      const inner = (t) => byType(t, inst.subgraph);
      const seed = expose(inst, inner("KSampler"), "seed");
      expose(inst, inner("FreeGuidancePAG"), "scale");
      if (seed) seed.value = 1234;
      // a second instance of the same definition, with its own seed
      const twin = inst.clone();
      g.add(twin);
      twin.pos = [inst.pos[0], inst.pos[1] + 400];
      for (const [i, input] of inst.inputs.entries()) {
        if (input.link == null) continue;
        const link = g.getLink(input.link);
        g.getNodeById(link.origin_id).connect(link.origin_slot, twin, i);
      }
      const twinSeed = twin.widgets?.find((w) => w.name === "seed");
      if (twinSeed) twinSeed.value = 777;
    """,
    # a subgraph inside a subgraph, with a bypassed node inside the inner one
    "subgraph_nested": """
      const inner = await convert([byType("FreeGuidancePAG"), byType("KSampler")]);
      inner.title = "Inner";
      byType("FreeGuidancePAG", inner.subgraph).mode = 4;
      const outer = await convert([byType("FreeGuidanceAdaptiveGuidance"), inner]);
      outer.title = "Outer";
    """,
    # a bypassed subgraph node (MODEL in → MODEL out: rewired) and a muted one (dropped)
    "subgraph_modes": """
      const bypassed = await convert([byType("FreeGuidancePAG")]);
      bypassed.mode = 4;
      const muted = await convert([byType("FreeGuidanceEvaluationReport")]);
      muted.mode = 2;
    """,
}


def build(frontend: frontends.Frontend, out: Path) -> None:
    base = template_models.prepare_base_dir(Path(tempfile.mkdtemp(prefix="fg-subgraph-fixtures-")))
    browser.seed_settings(base, frontend.settings())
    template = json.loads(TEMPLATE.read_text())
    with ComfyServer(base, extra_args=frontend.server_args()) as server, Editor(server.url) as editor:
        for name, recipe in RECIPES.items():
            editor.load(template, name)
            editor.page.evaluate(f"async () => {{ {_HELPERS} {recipe} }}")
            workflow = editor.graph_to_prompt()["workflow"]
            (out / f"{name}.json").write_text(json.dumps(workflow, indent=1) + "\n")
            print(f"wrote {out / name}.json ({len(workflow['nodes'])} nodes)")
        errors = editor.unexpected_console_errors()
        if errors:
            print("console errors:", *errors, sep="\n  ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frontend", default=frontends.PINNED_VERSION)
    parser.add_argument("--out", default=str(HERE))
    args = parser.parse_args()
    build(frontends.Frontend(args.frontend), Path(args.out))


if __name__ == "__main__":
    main()
