"""Every technique on the reference world, per pipeline, through the real ComfyUI host (one command, one run).

    FREE_GUIDANCE_CACHE=... $PY bench/world.py        (writes docs/benchmark/world.{json,md,png})

Pipelines (reference_model/WORLD.md): ``t2i`` (the SD1.5-family image model at its 16×16 training size),
``hires`` (the same model sampled at 2× and 4× — duplicated or broken objects are what hires methods exist to
fix), ``inpaint`` (one object's cell masked with SetLatentNoiseMask, a different object prompted there),
``video`` (the Wan 2.1-family model, 8 frames), ``negative`` (the image model at cfg 1 with a negative prompt
naming the shape to avoid: its rate and the positive attributes), ``diversity`` (one prompt's batch:
within-batch diversity, NegToMe's measure) and ``superres`` (the hires prompts sampled at 2× with the
downsampling objective against their 16×16 renders: TFG/SCG rows only). Every row is one workflow through ComfyUI's own
``validate_prompt`` and ``PromptExecutor`` (in process, CPU), nodes addressed by id only:
loader → Count Network Evaluations → the technique's node(s) → KSampler (or SamplerCustom for SAMPLER
nodes) → Network Evaluation Report → SaveLatent. The same seed (so the same noise) in every row of a
pipeline; latents are decoded with the linear VAE and scored by ``sceneworld.metrics`` (exact procedural
checks) and the attribute classifier (accuracy and Fréchet distance in its feature space).

A technique is one ``Entry`` in ``ENTRIES``: its node id, the inputs it overrides (everything else is the
node's own default, read from the node's schema), the pipelines it fits, the CFG scale it runs with, and
any further patch nodes of a stack (``extra``). Rows carry the counter's attention calls computed/skipped.
A node that refuses a model family (an error naming the node) is recorded in ``refused``, not as a row.
Adding a technique = adding one entry. A benchmark, not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from fg_testing import host as fg_host
from fg_testing import world as fg_world
from fg_testing.prompts import Graph

ROOT = Path(__file__).resolve().parents[1]


PIPELINES = ("t2i", "hires", "inpaint", "video", "negative", "diversity", "superres")
SAMPLED = PIPELINES[:6]  # the pipelines of the baselines (superres: its plain rows are hires ×2)
GUIDED = ("t2i", "inpaint", "video")  # pipelines of a plain guidance technique


@dataclass(frozen=True)
class Settings:
    """Per-pipeline sampling settings (the same for every row of the pipeline)."""

    steps: int
    cfg: float  # the baseline CFG scale techniques run on
    sampler: str = "euler"
    scheduler: str = "normal"
    prompts: int = 8
    repeat: int = 4
    shift: float | None = None  # video: ModelSamplingSD3's shift (None: the family's own, Wan 2.1: 8)


SETTINGS = {
    "t2i": Settings(steps=10, cfg=3.0, prompts=8, repeat=2),
    "hires": Settings(steps=10, cfg=3.0, prompts=4, repeat=1),
    "inpaint": Settings(steps=10, cfg=3.0, prompts=8, repeat=1),
    "video": Settings(steps=10, cfg=3.0, scheduler="simple", prompts=8, repeat=2),
    # a negative prompt on the image model at cfg 1 (``negative_workload``)
    "negative": Settings(steps=10, cfg=1.0, prompts=16, repeat=2),
    # one prompt's batch (NegToMe's reference is the batch's first row): within-prompt diversity
    "diversity": Settings(steps=10, cfg=3.0, prompts=1, repeat=16),
    "superres": Settings(steps=10, cfg=3.0, prompts=4, repeat=1),  # hires's prompts and seed
}
HIRES_SCALES = (2, 4)
SUPERRES_SCALE = 2
SEED = 0


@dataclass(frozen=True)
class Entry:
    """One technique row (per pipeline it fits).

    ``kind``: "none" (plain sampling), "patch" (MODEL → MODEL node), "sampler" (a SAMPLER node, run with
    SamplerCustom), "hires_sampler" (a SAMPLER that upscales the native result: DiffuseHigh),
    "objective_sampler" (a SAMPLER node given the pipeline's measurement objective: TFG, SCG), "upscale"
    (no model: the measurement image upscaled by ComfyUI's ImageScaleBy).
    ``settings``: inputs given to the node; every other input is its schema default.
    ``extra``: more MODEL → MODEL nodes (node id, inputs) applied after ``node``, in order: a stack in one row.
    ``note``: why a row is refused or what it means, kept with the row in world.json.
    """

    technique: str
    node: str | None = None
    kind: str = "patch"
    settings: dict = field(default_factory=dict)
    pipelines: tuple[str, ...] = GUIDED
    cfg: float | None = None  # None: the pipeline's baseline CFG
    source: str = "pack"  # "pack" | "core" | "baseline"
    hires_scales: tuple[int, ...] = (2,)
    extra: tuple[tuple[str, dict], ...] = ()
    note: str = ""


def _baselines() -> list[Entry]:
    out = [
        Entry("cond only", kind="none", cfg=1.0, pipelines=SAMPLED, source="baseline", hires_scales=(2, 4)),
        Entry(
            "CFG",
            kind="none",
            pipelines=tuple(p for p in SAMPLED if p != "negative"),  # negative: NEGATIVE_ENTRIES' own
            source="baseline",
            hires_scales=(2, 4),
        ),
    ]
    for scale in (1.5, 5.0, 7.5):
        out.append(
            Entry(f"CFG {scale:g}", kind="none", cfg=scale, pipelines=("t2i", "video"), source="baseline")
        )
    return out


ENTRIES: list[Entry] = [
    *_baselines(),
    # The pack's techniques at their defaults (on the pipeline's baseline CFG), then a small sweep.
    Entry("Adaptive Guidance", "FreeGuidanceAdaptiveGuidance"),
    Entry(
        "Adaptive Guidance", "FreeGuidanceAdaptiveGuidance", settings={"threshold": 0.999}, pipelines=("t2i",)
    ),
    Entry("CFG Interval", "FreeGuidanceCFGInterval"),
    Entry("LinearAG", "FreeGuidanceLinearAG"),
    Entry("CFG Schedule", "FreeGuidanceCFGSchedule"),
    Entry("CFG++ (KSampler euler)", "FreeGuidanceCFGppEuler", cfg=0.6),
    Entry("CFG++ sampler", "FreeGuidanceCFGppSampler", kind="sampler", cfg=0.6),
    Entry("PCG sampler", "FreeGuidancePCGSampler", kind="sampler"),
    # ICG's default mode (random_tokens) needs the prompt's CLIP, which the world has not: its gaussian mode.
    Entry("ICG", "FreeGuidanceICG", settings={"mode": "gaussian"}),
    Entry("PAG", "FreeGuidancePAG"),
    Entry("PAG", "FreeGuidancePAG", settings={"scale": 1.0}, pipelines=("t2i",)),
    Entry("SEG", "FreeGuidanceSEG"),
    Entry("STG", "FreeGuidanceSTG"),
    Entry("SAG", "FreeGuidanceSAG"),
    Entry("TSG", "FreeGuidanceTSG"),
    Entry("TSG alone", "FreeGuidanceTSG", cfg=1.0, pipelines=("t2i",)),
    Entry("FouriScale", "FreeGuidanceFouriScale", pipelines=("hires",), hires_scales=(2, 4)),
    Entry(
        "DiffuseHigh",
        "FreeGuidanceDiffuseHigh",
        kind="hires_sampler",
        pipelines=("hires",),
        hires_scales=(2, 4),
    ),
    # ComfyUI core's peers at equal settings (their defaults, on the same baseline CFG).
    Entry("PAG (core)", "PerturbedAttentionGuidance", source="core"),
    Entry("SAG (core)", "SelfAttentionGuidance", source="core", pipelines=("t2i", "inpaint")),
    Entry("SkipLayerGuidanceDiT (core)", "SkipLayerGuidanceDiT", source="core", pipelines=("video",)),
    Entry("APG (core)", "APG", source="core"),
    Entry("CFGZeroStar (core)", "CFGZeroStar", source="core"),
    Entry("RescaleCFG (core)", "RescaleCFG", source="core"),
    Entry(
        "Deep Shrink (core)",
        "PatchModelAddDownscale",
        source="core",
        pipelines=("hires",),
        hires_scales=(2, 4),
    ),
    # Core's own bug at the pinned commit, reproduced without any of the pack's nodes (no counter either):
    # EasyCache's apply_cache_diff adds each cond's cached diff (one cond's rows) to the whole batched call
    # (cond and uncond together), so a skipped step fails for a batch > 1 per prompt (ComfyUI #10344, fixed
    # after the pin by #10376); at batch 1 its code broadcasts both diffs onto both halves (wrong, silently;
    # a batch-1 image run skipped no step in 10). No setting gives an honest row here: refused, core's error.
    Entry(
        "EasyCache (core)",
        "EasyCache",
        source="core",
        pipelines=("t2i", "video"),
        note="core bug at the pinned ComfyUI (apply_cache_diff does not slice the batch; ComfyUI #10344, "
        "fixed upstream by #10376): fails on its first skipped step whenever cond and uncond share a call",
    ),
    Entry("LazyCache (core)", "LazyCache", source="core", pipelines=("t2i", "video")),
]

# ---- Issues #15 and #16 on the world (branch wcache): caches and their stacks, STG-A on the UNet, negative
# prompts at cfg 1. ----
CFG_CACHE = "FreeGuidanceCFGCache"
# the paper-style schedule that reached 22 evaluations on the digits model (bench/cache.py): full steps only
# before 'start', then every unconditional prediction rebuilt (no refresh)
CFG_CACHE_NO_REFRESH = {"start": 0.1, "interval": 1000}
AG_DIGITS = {"threshold": 0.985, "start_percent": 0.0}  # the digits model's best stack settings
CACHE_ENTRIES: list[Entry] = [
    Entry("CFG-Cache", CFG_CACHE, pipelines=("t2i", "video")),
    Entry("CFG-Cache", CFG_CACHE, settings=CFG_CACHE_NO_REFRESH, pipelines=("t2i", "video")),
    # UNets are refused by both FasterCache nodes (DiT attention modules only): t2i records the refusal
    Entry("FasterCache Feature Reuse", "FreeGuidanceFasterCacheFeatureReuse", pipelines=("t2i", "video")),
    Entry("FasterCache", "FreeGuidanceFasterCache", pipelines=("t2i", "video")),
    Entry(
        "CFG-Cache + Adaptive Guidance",
        CFG_CACHE,
        settings=CFG_CACHE_NO_REFRESH,
        extra=(("FreeGuidanceAdaptiveGuidance", AG_DIGITS),),
        pipelines=("t2i", "video"),
    ),
    Entry(
        "LinearAG + Adaptive Guidance",
        "FreeGuidanceLinearAG",
        settings={"end_percent": 0.8},
        extra=(("FreeGuidanceAdaptiveGuidance", AG_DIGITS),),
        pipelines=("t2i", "video"),
    ),
    Entry(
        "CFG-Cache + FasterCache Feature Reuse",
        CFG_CACHE,
        settings=CFG_CACHE_NO_REFRESH,
        extra=(("FreeGuidanceFasterCacheFeatureReuse", {}),),
        pipelines=("video",),
    ),
    # STG's default mode STG-R (skip block) is refused on a UNet; STG-A (skip attention) is its UNet mode
    Entry(
        "STG-A", "FreeGuidanceSTG", settings={"mode": "STG-A (skip attention)"}, pipelines=("t2i", "inpaint")
    ),
]
# The ``negative`` pipeline: the sampler's negative is a prompt naming the shape to avoid (``negative_workload``);
# "cond only" (cfg 1) is plain sampling that ignores it. NASA/NAG read it as the sampler's negative (the same
# tensor as the node's own 'negative' input, without a second prompt node).
SAMPLER_NEGATIVE = {"negative_source": "sampler negative"}
# NegToMe's official UNet min_grid (32 at SDXL's 128² latent: a quarter of the latent side) scaled to the
# world's 16² latent: 4, every output attention layer (8² and 4²).
NEGTOME_WORLD = {"min_grid": 4}
NEGATIVE_ENTRIES: list[Entry] = [
    Entry("CFG 3 (negative as uncond)", kind="none", cfg=3.0, pipelines=("negative",), source="baseline"),
    Entry("NASA", "FreeGuidanceNASA", settings=SAMPLER_NEGATIVE, pipelines=("negative",)),
    *[
        Entry("NASA", "FreeGuidanceNASA", settings={**SAMPLER_NEGATIVE, "alpha": a}, pipelines=("negative",))
        for a in (0.5, 1.0)  # the SD1.5 default is 0.1; the paper's sweeps go to ~1
    ],
    Entry("NASA", "FreeGuidanceNASA", settings={**SAMPLER_NEGATIVE, "mode": "nag"}, pipelines=("negative",)),
    # S-CFG varies the CFG scale per region: it needs CFG > 1, so it runs at CFG 3 (against the row above)
    Entry("S-CFG", "FreeGuidanceSCFG", cfg=3.0, pipelines=("negative",)),
    # batch diversity: one prompt's batch, NegToMe against plain CFG 3 (and against cond only at cfg 1)
    Entry("NegToMe", "FreeGuidanceNegToMe", settings=NEGTOME_WORLD, pipelines=("diversity",)),
    Entry("NegToMe", "FreeGuidanceNegToMe", settings=NEGTOME_WORLD, cfg=1.0, pipelines=("diversity",)),
    Entry(
        "NegToMe", "FreeGuidanceNegToMe", settings={**NEGTOME_WORLD, "t_end": 500.0}, pipelines=("diversity",)
    ),
]
ENTRIES += CACHE_ENTRIES + NEGATIVE_ENTRIES

# ---- Guidance toward an objective (issue #17): the TFG and SCG samplers given the pack's Image Measurement
# objective through the World VAE. inpaint: the masked-image objective on the kept region, sampled from an
# empty latent (no SetLatentNoiseMask), the new object only prompted; superres: sampled at 2× (32×32) with the
# downsampling objective against the prompt's own 16×16 render. The World VAE decodes with gain 0.4 per
# orthonormal model-space latent value, so one μ step of 1/0.4² = 6.25 moves a measured pixel fully onto the
# measurement (masked); 2×2 average pooling spreads it over 4 pixels: 25. Cost: backward passes through the UNet.
OBJECTIVE_PIPELINES = ("inpaint", "superres")
MU_FULL = {"inpaint": 6.25, "superres": 25.0}


def _tfg(technique: str, pipelines: tuple[str, ...] = OBJECTIVE_PIPELINES, **settings) -> Entry:
    return Entry(
        technique, "FreeGuidanceTFGSampler", kind="objective_sampler", settings=settings, pipelines=pipelines
    )


ENTRIES += [
    Entry(
        "TFG rho=mu=0",
        "FreeGuidanceTFGSampler",
        kind="objective_sampler",
        settings={"preset": "TFG", "rho": 0.0, "mu": 0.0},
        pipelines=OBJECTIVE_PIPELINES,
        source="baseline",
    ),
    Entry(
        "SetLatentNoiseMask (euler_ancestral)",
        "KSamplerSelect",
        kind="sampler",
        settings={"sampler_name": "euler_ancestral"},
        pipelines=("inpaint",),
        source="core",
    ),
    _tfg("MPGD"),
    *(_tfg("MPGD", (pipeline,), mu=mu) for pipeline, mu in MU_FULL.items()),
    _tfg("TFG", preset="TFG"),
    *(_tfg("TFG", (pipeline,), preset="TFG", mu=mu) for pipeline, mu in MU_FULL.items()),
    _tfg("DPS", preset="DPS"),
    _tfg("DPS", preset="DPS", rho=16.0),  # DPS divides the gradient by |loss|: ρ 1 barely moves x
    Entry(
        "SCG",
        "FreeGuidanceSCGSampler",
        kind="objective_sampler",
        settings={"candidates": 4},
        pipelines=OBJECTIVE_PIPELINES,
    ),
    Entry("SCG", "FreeGuidanceSCGSampler", kind="objective_sampler", pipelines=("inpaint",)),
    *(
        Entry(
            f"{method} upscale",
            "ImageScaleBy",
            kind="upscale",
            settings={"upscale_method": method, "scale_by": float(SUPERRES_SCALE)},
            pipelines=("superres",),
            source="baseline",
        )
        for method in ("bilinear", "nearest-exact")
    ),
]

WIRED = {"MODEL": "model", "VAE": "vae"}


def read_rows(pipelines: tuple[str, ...], techniques: set[str], path: Path | None = None) -> dict | str:
    """The rows and refusals of ``techniques`` on ``pipelines`` in world.json (this script's one run), for the
    other benchmarks to show without a second world run; a sentence saying why not when there are none."""
    path = path or ROOT / "docs" / "benchmark" / "world.json"
    if not path.exists():
        return f"not run: {path.name} is missing (bench/world.py writes it)"
    data = json.loads(path.read_text())
    pick = [r for r in data["rows"] if r["pipeline"] in pipelines and r["technique"] in techniques]
    refused = [
        r for r in data.get("refused", []) if r["pipeline"] in pipelines and r["technique"] in techniques
    ]
    if not pick:
        return (
            f"not run: {path.name} has no rows of {', '.join(sorted(techniques))} yet (bench/world.py --only)"
        )
    return {
        "source": str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path),
        "rows": pick,
        "refused": refused,
    }


# Node schemas (node id -> its INPUT_TYPES) from a server's /object_info, for a process that queues on a server
# and has not imported ComfyUI (the demo); None: read them from the ComfyUI imported in process.
SCHEMAS: dict | None = None


def node_defaults(node_id: str) -> tuple[dict, list[tuple[str, str]]]:
    """(the node's schema defaults for its widget inputs, [(name, type)] of its linked inputs)."""
    if SCHEMAS is not None:
        schema = SCHEMAS[node_id]
    else:
        import nodes

        schema = nodes.NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()
    values, links = {}, []
    for name, spec in schema.get("required", {}).items():
        kind = spec[0]
        options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        if isinstance(kind, (list, tuple)):
            values[name] = options.get("default", kind[0])
        elif kind == "COMBO":
            values[name] = options.get("default", (options.get("options") or [None])[0])
        elif "default" in options:
            values[name] = options["default"]
        elif kind == "BOOLEAN":
            values[name] = False
        else:
            links.append((name, kind))
    return values, links


def patch_node(g: Graph, entry: Entry, model, vae=None, extra: dict | None = None):
    return add_node(g, entry.node, {**entry.settings, **(extra or {})}, model, vae)


def add_node(g: Graph, node: str, settings: dict, model, vae=None):
    """(the node wired to the model/VAE, its inputs): schema defaults overridden by ``settings``."""
    values, links = node_defaults(node)
    inputs = {**values, **settings}
    for name, kind in links:
        if kind == "MODEL":
            inputs[name] = model
        elif kind == "VAE" and vae is not None:
            inputs[name] = vae
        elif name not in inputs:
            raise ValueError(f"{node}: linked input {name!r} ({kind}) has no source in the benchmark")
    return g.node(node, **inputs), inputs


def plain(inputs: dict) -> dict:
    return {k: v for k, v in inputs.items() if not isinstance(v, list)}  # without the links


@dataclass
class Workload:
    """The prompts of one pipeline run (and the ground truth they are scored against)."""

    pipeline: str
    texts: list[str]
    repeat: int
    items: list  # one scene/video per sample
    groups: list[int]
    sources: list | None = None  # inpaint: source scenes per sample
    cells: list[str] | None = None  # inpaint: masked cell per sample
    negatives: list[str] | None = None  # negative: the negative prompt per prompt (the sampler's negative)


def workloads() -> dict[str, Workload]:
    from sceneworld import world

    out = {}
    for pipeline in ("t2i", "hires"):
        s = SETTINGS[pipeline]
        scenes = world.scenes(s.prompts, 2026)
        scenes = [world.parse_scene(sc.prompt()) for sc in scenes]
        out[pipeline] = Workload(
            pipeline,
            [sc.prompt() for sc in scenes],
            s.repeat,
            [sc for sc in scenes for _ in range(s.repeat)],
            [i for i in range(len(scenes)) for _ in range(s.repeat)],
        )
    s = SETTINGS["inpaint"]
    sources = [world.parse_scene(sc.prompt()) for sc in world.scenes(s.prompts, 2027)]
    edited, cells = [], []
    for sc in sources:
        target = sc.objects[0]
        new = world.SceneObject(
            shape=world.SHAPES[(world.SHAPES.index(target.shape) + 1) % len(world.SHAPES)],
            colour=world.COLOURS[(world.COLOURS.index(target.colour) + 1) % len(world.COLOURS)],
            size=target.size,
            position=target.position,
        )
        edited.append(world.Scene((new, *sc.objects[1:]), sc.background))
        cells.append(target.position)
    out["inpaint"] = Workload(
        "inpaint",
        [e.prompt() for e in edited],
        s.repeat,
        [e for e in edited for _ in range(s.repeat)],
        [i for i in range(len(edited)) for _ in range(s.repeat)],
        sources=[x for x in sources for _ in range(s.repeat)],
        cells=[c for c in cells for _ in range(s.repeat)],
    )
    out["superres"] = dataclasses.replace(out["hires"], pipeline="superres")
    s = SETTINGS["video"]
    videos = [world.parse_video(v.prompt()) for v in world.videos(s.prompts, 2028)]
    out["video"] = Workload(
        "video",
        [v.prompt() for v in videos],
        s.repeat,
        [v for v in videos for _ in range(s.repeat)],
        [i for i in range(len(videos)) for _ in range(s.repeat)],
    )
    out["negative"] = negative_workload()
    s = SETTINGS["diversity"]
    scene = out["t2i"].items[0]
    out["diversity"] = Workload("diversity", [scene.prompt()], s.repeat, [scene] * s.repeat, [0] * s.repeat)
    return out


def negative_shape(shape: str) -> str:
    """The shape a negative prompt names instead of ``shape``: the next of the world's shapes."""
    from sceneworld import world

    return world.SHAPES[(world.SHAPES.index(shape) + 1) % len(world.SHAPES)]


def negative_workload() -> Workload:
    """One-object scenes; the negative prompt is the same scene with the object's shape swapped (the attribute
    the image model confuses most), so the rate of the negative shape and the positive attributes are scored."""
    import numpy as np
    from sceneworld import world

    s = SETTINGS["negative"]
    rng = np.random.default_rng(2029)
    scenes, negatives = [], []
    for i in range(s.prompts):
        obj = world.random_object(rng, world.POSITIONS[i % len(world.POSITIONS)])
        scene = world.parse_scene(world.Scene((obj,), world.BACKGROUNDS[0]).prompt())
        swapped = world.SceneObject(
            shape=negative_shape(obj.shape), colour=obj.colour, size=obj.size, position=obj.position
        )
        scenes.append(scene)
        negatives.append(world.Scene((swapped,), scene.background).prompt())
    return Workload(
        "negative",
        [sc.prompt() for sc in scenes],
        s.repeat,
        [sc for sc in scenes for _ in range(s.repeat)],
        [i for i in range(len(scenes)) for _ in range(s.repeat)],
        negatives=negatives,
    )


def inpaint_source(g: Graph, work: Workload):
    """World Inpaint Source of the pipeline's source scenes: (LATENT, MASK of the masked cell) node."""
    return g.node(
        "WorldRefInpaintSource",
        scenes="\n".join(sc.prompt() for sc in work.sources[:: work.repeat]),
        positions="\n".join(work.cells[:: work.repeat]),
        repeat=work.repeat,
    )


def measurement(g: Graph, work: Workload, vae, scale: int) -> tuple[list, list, dict]:
    """(objective, measurement IMAGE, the objective's settings) of an objective pipeline: inpaint, the source
    scene outside the masked cell; superres, the prompt's 16×16 render (World Inpaint Source renders and
    encodes scenes; its masks are not used there), measured through 2×2 average pooling."""
    if work.pipeline == "inpaint":
        source = inpaint_source(g, work)
        extra = {"operator": "masked (inpainting)", "mask": [Graph.id(source), 1]}
    else:
        source = g.node(
            "WorldRefInpaintSource",
            scenes="\n".join(work.texts),
            positions="top-left",
            repeat=work.repeat,
        )
        extra = {"operator": "downsample (super-resolution)", "factor": scale}
    image = g.node("VAEDecode", samples=[Graph.id(source), 0], vae=vae)
    node = Entry("objective", "FreeGuidanceObjectiveImageMeasurement")
    objective, inputs = patch_node(g, node, None, vae, {"image": image, **extra})
    values = {k: v for k, v in inputs.items() if not isinstance(v, list)}
    return objective, image, {"node": node.node, **values}


def build_workflow(entry: Entry, work: Workload, scale: int = 1) -> tuple[dict, dict, dict]:
    """(API prompt, output node ids, the row's settings) for one entry on one pipeline."""
    s = SETTINGS[work.pipeline]
    cfg = s.cfg if entry.cfg is None else entry.cfg
    g = Graph()
    kind = "video" if work.pipeline == "video" else "image"
    if kind == "video":
        model = g.node("UNETLoader", unet_name=fg_world.VIDEO_FILE, weight_dtype="default")
        if s.shift is not None:
            model = g.node("ModelSamplingSD3", model=model, shift=s.shift)
    else:
        model = g.node("WorldRefImageModelLoader", unet_name=fg_world.IMAGE_FILE)
    model = g.node("FreeGuidanceCountEvaluations", model=model)
    counted = model
    vae = g.node("WorldRefVAE") if kind == "image" else None
    node_inputs: dict = {}
    stacked = []
    if entry.kind == "patch":
        model, node_inputs = patch_node(g, entry, model, vae)
        for node, values in entry.extra:
            model, inputs = add_node(g, node, values, model, vae)
            stacked.append({"node": node, **plain(inputs)})
    positive = g.node("WorldRefPrompt", prompts="\n".join(work.texts), kind=kind, repeat=work.repeat)
    if work.negatives is not None:
        negative = g.node("WorldRefPrompt", prompts="\n".join(work.negatives), kind=kind, repeat=work.repeat)
    else:
        negative = g.node("ConditioningZeroOut", conditioning=positive)
    batch = len(work.items)
    mask_id = None
    if work.pipeline == "video":
        latent = g.node("EmptyHunyuanLatentVideo", width=64, height=64, length=29, batch_size=batch)
    elif work.pipeline == "inpaint" and entry.kind != "objective_sampler":
        source = inpaint_source(g, work)
        latent = g.node("SetLatentNoiseMask", samples=source, mask=[Graph.id(source), 1])
        mask_id = Graph.id(source)
    else:
        native = 1 if entry.kind == "hires_sampler" else scale
        latent = g.node("EmptyLatentImage", width=128 * native, height=128 * native, batch_size=batch)
    ids: dict = {}

    def ksampler(model_in, latent_in):
        return g.node(
            "KSampler",
            model=model_in,
            seed=SEED,
            steps=s.steps,
            cfg=cfg,
            sampler_name=s.sampler,
            scheduler=s.scheduler,
            positive=positive,
            negative=negative,
            latent_image=latent_in,
            denoise=1.0,
        )

    def custom(model_in, sampler, latent_in, add_noise=True):
        sigmas = g.node("BasicScheduler", model=model_in, scheduler=s.scheduler, steps=s.steps, denoise=1.0)
        return g.node(
            "SamplerCustom",
            model=model_in,
            add_noise=add_noise,
            noise_seed=SEED,
            cfg=cfg,
            positive=positive,
            negative=negative,
            sampler=sampler,
            sigmas=sigmas,
            latent_image=latent_in,
        )

    reports = []
    if entry.kind in ("none", "patch"):
        sampled = ksampler(model, latent)
    elif entry.kind == "sampler":
        sampler, node_inputs = patch_node(g, entry, model, vae)
        sampled = custom(model, sampler, latent)
    elif entry.kind == "hires_sampler":
        base = ksampler(model, latent)
        first = g.node("FreeGuidanceEvaluationReport", model=counted, latent=base)
        reports.append(Graph.id(first))
        size = 16 * scale  # the linear VAE's pixel = one latent pixel
        sampler, node_inputs = patch_node(g, entry, model, vae, {"width": size, "height": size})
        sampled = custom(model, sampler, first, add_noise=False)
    elif entry.kind == "objective_sampler":
        objective, _, objective_settings = measurement(g, work, vae, scale)
        sampler, node_inputs = patch_node(g, entry, model, vae, {"objective": objective})
        sampled = custom(model, sampler, latent)
    elif entry.kind == "upscale":
        _, image, objective_settings = measurement(g, work, vae, scale)
        scaled, node_inputs = patch_node(g, entry, model, vae, {"image": image})
        sampled = g.node("VAEEncode", pixels=scaled, vae=vae)
    else:
        raise ValueError(f"unknown entry kind {entry.kind!r}")
    if entry.kind != "upscale":  # no model runs
        reports.append(Graph.id(g.node("FreeGuidanceEvaluationReport", model=counted, latent=sampled)))
    ids["reports"] = reports
    ids["latent"] = Graph.id(g.node("SaveLatent", samples=sampled, filename_prefix="world"))
    settings = {"cfg": cfg, "steps": s.steps, "sampler": s.sampler, "scheduler": s.scheduler}
    if entry.node:
        settings["node"] = entry.node
        settings.update(plain(node_inputs))
    if stacked:
        settings["stack"] = stacked
    if entry.kind == "objective_sampler":
        settings["objective"] = objective_settings
    if work.pipeline in ("hires", "superres"):
        settings["scale"] = scale
    ids["mask"] = mask_id
    return g.prompt, ids, settings


class Scorer:
    def __init__(self):
        import torch
        from sceneworld import world

        self.classifier = fg_world.load_classifier()
        reference = world.scene_batch(world.scenes(1024, 4242))
        with torch.no_grad():
            self.reference_features = self.classifier.features(reference)

    def image_metrics(self, images, work: Workload) -> dict:
        import torch
        from digitref.metrics import frechet_distance
        from sceneworld import classifier, metrics

        out = metrics.score_images(images, work.items)
        with torch.no_grad():
            features = self.classifier.features(images.float())
        out["classifier_accuracy"] = classifier.accuracy(self.classifier, images, work.items)
        if len(features) > 1:  # a covariance needs two samples (--smoke's one-image diversity pipeline)
            out["fd"] = frechet_distance(features, self.reference_features)
        out["diversity"] = metrics.diversity(images, work.groups)
        return out

    def score(self, pipeline: str, latent, work: Workload, scale: int) -> dict:
        from sceneworld import metrics, vae, world

        if pipeline == "video":
            videos = vae.decode_video_latent(latent)
            out = metrics.score_videos(videos, work.items)
            out["diversity"] = metrics.diversity(videos, work.groups)
            return out
        images = vae.decode_image_latent(latent)
        if pipeline in ("t2i", "diversity"):
            return self.image_metrics(images, work)
        if pipeline == "negative":
            return {**self.image_metrics(images, work), **negative_metrics(images, work)}
        if pipeline == "hires":
            return metrics.score_hires(images, work.items)
        if pipeline == "superres":
            import torch.nn.functional as F

            out = metrics.score_hires(images, work.items)
            error = F.avg_pool2d(images, scale) - world.scene_batch(work.items)
            out["measurement_rmse"] = float(error.pow(2).mean().sqrt())
            return out
        sources = world.scene_batch(work.sources)
        return metrics.score_inpaint(images, sources, work.items, work.cells)


def negative_metrics(images, work: Workload) -> dict:
    """Per sample, the largest object found in the prompted object's cell: the rate of the negative prompt's
    shape there, and of the positive shape."""
    from sceneworld import metrics

    negative = positive = 0
    for image, scene in zip(metrics.to_hwc(images), work.items, strict=True):
        target = scene.objects[0]
        found, _, _ = metrics.detect(image)
        here = [d for d in found if d.position == target.position]
        shape = max(here, key=lambda d: d.area).shape if here else None
        negative += shape == negative_shape(target.shape)
        positive += shape == target.shape
    return {
        "negative_shape_rate": negative / len(work.items),
        "positive_shape_rate": positive / len(work.items),
    }


def rows_for(entries: list[Entry]) -> list[tuple[Entry, str, int]]:
    out = []
    for entry in entries:
        for pipeline in PIPELINES:
            if pipeline not in entry.pipelines:
                continue
            scales = {"hires": entry.hires_scales, "superres": (SUPERRES_SCALE,)}.get(pipeline, (1,))
            for scale in scales:
                out.append((entry, pipeline, scale))
    return out


def run(only: list[str] | None = None, pipelines: list[str] | None = None) -> dict:
    import torch

    host = fg_host.init_host()
    fg_world.load_in_process(host)
    scorer = Scorer()
    works = workloads()
    entries = [e for e in ENTRIES if not only or e.technique in only or e.source == "baseline"]
    rows, refused = [], []
    for entry, pipeline, scale in rows_for(entries):
        if pipelines and pipeline not in pipelines:
            continue
        work = works[pipeline]
        prompt, ids, settings = build_workflow(entry, work, scale)
        start = time.time()
        try:
            result = fg_host.run_prompt(prompt, expect_success=False)
        except Exception as error:  # a validation error: the node's inputs do not fit this pipeline
            refused.append(
                {"pipeline": pipeline, "technique": entry.technique, "error": str(error)[:400]}
                | ({"note": entry.note} if entry.note else {})
            )
            print(f"{pipeline:>8} {entry.technique:>30}: refused ({str(error)[:120]})", flush=True)
            continue
        seconds = time.time() - start
        if not result.success:
            message = next((m[1] for m in result.messages if m[0] == "execution_error"), {})
            text = f"{message.get('node_type', '')}: {message.get('exception_message', '')}".strip()
            refused.append(
                {
                    "pipeline": pipeline,
                    "technique": entry.technique,
                    "settings": settings,
                    "error": text[:400],
                }
                | ({"note": entry.note} if entry.note else {})
            )
            print(f"{pipeline:>8} {entry.technique:>30}: refused ({text[:120]})", flush=True)
            continue
        latent = fg_world.read_saved_latent(host.base_dir, result.outputs, ids["latent"])
        total = 0
        extra: dict = {}
        attention: dict = {}  # attention calls computed/skipped by a feature cache (the counter's own)
        backward: dict = {}
        for report in ids["reports"]:
            counts = result.outputs[report]["free_guidance_evaluations"][0]
            total += counts["total"]
            for k, v in counts["extra"].items():
                extra[k] = extra.get(k, 0) + v
            for k, v in counts.get("attention", {}).items():
                attention[k] = attention.get(k, 0) + v
            for k, v in counts.get("backward", {}).items():
                backward[k] = backward.get(k, 0) + v
        with torch.no_grad():
            metrics = scorer.score(pipeline, latent, work, scale)
        row = {
            "pipeline": pipeline,
            "technique": entry.technique,
            "source": entry.source,
            "settings": settings,
            "label": label(entry, settings, pipeline, scale),
            "evaluations_per_sample": float(total),
            "seconds_per_sample": round(seconds / len(work.items), 4),
            "metrics": {k: round(float(v), 4) for k, v in metrics.items()},
        }
        if extra:
            row["extra_evaluations"] = extra
        if attention:
            row["attention"] = attention
        if entry.note:
            row["note"] = entry.note
        if backward:  # TFG: "model" = evaluations back-propagated, "objective" = objective backward passes
            row["backward_per_sample"] = {k: float(v) for k, v in backward.items()}
        rows.append(row)
        shown = " ".join(f"{k} {v:.3f}" for k, v in list(row["metrics"].items())[:5])
        print(
            f"{pipeline:>8} {entry.technique:>30} x{scale}: {total:4d} evals {seconds:6.1f}s  {shown}",
            flush=True,
        )
    return {"rows": rows, "refused": refused}


def models_record() -> dict:
    out = {}
    for kind in ("image", "video"):
        path = fg_world.WEIGHTS_DIR / f"world_{kind}_training.json"
        record = json.loads(path.read_text()) if path.exists() else {}
        out[kind] = {
            "file": f"reference_model/weights/world_{kind}.safetensors",
            "family": "SD1.5 (supported_models.SD15, v-prediction)"
            if kind == "image"
            else "Wan 2.1 T2V (flow)",
            "parameters": record.get("parameters"),
            "training_seconds": record.get("seconds"),
            "recipe": record.get("recipe"),
        }
    cls = fg_world.WEIGHTS_DIR / "world_classifier.json"
    if cls.exists():
        out["classifier"] = json.loads(cls.read_text())
    return out


HEADLINE = {
    "t2i": [
        "prompt_accuracy",
        "count_accuracy",
        "colour_accuracy",
        "shape_accuracy",
        "classifier_accuracy",
        "fd",
        "diversity",
    ],
    "hires": [
        "prompt_accuracy",
        "count_accuracy",
        "duplicated_rate",
        "broken_rate",
        "downsampled_prompt_accuracy",
    ],
    "inpaint": ["new_object_accuracy", "new_object_attributes", "error_outside_mask", "prompt_accuracy"],
    "superres": [
        "prompt_accuracy",
        "count_accuracy",
        "duplicated_rate",
        "broken_rate",
        "downsampled_prompt_accuracy",
        "measurement_rmse",
    ],
    "video": [
        "prompt_accuracy",
        "direction_accuracy",
        "speed_accuracy",
        "shape_accuracy",
        "identity_consistency",
        "flicker",
    ],
    "diversity": ["diversity", "prompt_accuracy", "shape_accuracy", "classifier_accuracy", "fd"],
    "negative": [
        "negative_shape_rate",
        "positive_shape_rate",
        "prompt_accuracy",
        "colour_accuracy",
        "classifier_accuracy",
        "diversity",
    ],
}
SWEPT = ("threshold", "scale", "renoise", "cfg")


def label(entry: Entry, settings: dict, pipeline: str, scale: int) -> str:
    """The row's settings in words: CFG, the hires scale, what the entry changes from the node's defaults."""
    bits = [] if entry.kind == "upscale" else [f"cfg {settings['cfg']:g}"]
    if pipeline in ("hires", "superres"):
        bits.append(f"×{scale}")
    bits += [f"{k} {v}" for k, v in entry.settings.items()]
    if entry.node and not entry.settings:
        bits.append("defaults")
    for node, values in entry.extra:  # a stack: each further node and what it changes
        bits.append(
            f"+ {node.removeprefix('FreeGuidance')} "
            + (", ".join(f"{k} {v}" for k, v in values.items()) or "defaults")
        )
    return ", ".join(bits)


def markdown(results: dict) -> str:
    runs = results.get("runs") or []
    how = (
        "in one run"
        if len(runs) <= 1
        else f"in {len(runs)} invocations ("
        + "; ".join(f"{', '.join(r['pipelines'])}: {r['seconds']:.0f} s" for r in runs)
        + ")"
    )
    lines = [
        "# Techniques on the reference world",
        "",
        f"Generated by `bench/world.py` {how} (see its docstring and `reference_model/WORLD.md`). "
        "Evaluations per sample are the pack's counter (one evaluation = one conditional or unconditional "
        "network pass over the batch); seconds per sample are wall time per row divided by the samples "
        "(one CPU thread, a shared machine: compare ratios within this file only).",
        "",
    ]
    for pipeline in PIPELINES:
        s = SETTINGS[pipeline]
        rows = [r for r in results["rows"] if r["pipeline"] == pipeline]
        if not rows:
            continue
        n = s.prompts * s.repeat
        lines += [
            f"## {pipeline}",
            "",
            f"{n} samples ({s.prompts} prompts × {s.repeat}), {s.steps} steps `{s.sampler}`/`{s.scheduler}`, "
            f"seed {SEED}, baseline CFG {s.cfg:g}.",
            "",
        ]
        keys = HEADLINE[pipeline]
        lines.append("| technique | settings | evals/sample | s/sample | " + " | ".join(keys) + " |")
        lines.append("|---|---|---:|---:|" + "---:|" * len(keys))
        for r in rows:
            values = " | ".join(f"{r['metrics'].get(k, float('nan')):.3f}" for k in keys)
            attn = r.get("attention")
            evals = f"{r['evaluations_per_sample']:.0f}"
            if attn:
                evals += f" (attention {attn.get('computed', 0)} computed / {attn.get('skipped', 0)} skipped)"
            if r.get("backward_per_sample"):
                evals += (
                    " (backward "
                    + " + ".join(f"{v:.0f} {k}" for k, v in r["backward_per_sample"].items())
                    + ")"
                )
            lines.append(
                f"| {r['technique']} | {r['label']} | {evals} | {r['seconds_per_sample']:.3f} | {values} |"
            )
        lines.append("")
    if results.get("refused"):
        lines += [
            "## Refused (the node's own error)",
            "",
            "| pipeline | technique | error |",
            "|---|---|---|",
        ]
        for r in results["refused"]:
            lines.append(f"| {r['pipeline']} | {r['technique']} | {r['error'][:200].replace('|', '/')} |")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    from digitref.plot import Panel, line_chart

    panels = []
    for pipeline, key, title in (
        ("t2i", "prompt_accuracy", "t2i: prompt-attribute accuracy"),
        ("hires", "duplicated_rate", "hires: duplicated-object rate (lower is better)"),
        ("inpaint", "new_object_accuracy", "inpaint: new-object accuracy"),
        ("superres", "measurement_rmse", "superres: RMSE to the 16×16 measurement (lower is better)"),
        ("video", "prompt_accuracy", "video: prompt-attribute accuracy"),
    ):
        series: dict[str, list] = {}
        for r in results["rows"]:
            if r["pipeline"] == pipeline:
                series.setdefault(r["technique"], []).append((r["evaluations_per_sample"], r["metrics"][key]))
        if series:
            panels.append(Panel(title, "network evaluations per sample", series, better="points"))
    if panels:
        line_chart(panels, path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmark"))
    parser.add_argument("--only", nargs="*", help="only these techniques (plus the baselines)")
    parser.add_argument("--pipelines", nargs="*", choices=PIPELINES)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--merge", action="store_true", help="keep the other pipelines' rows of an existing world.json"
    )
    parser.add_argument("--smoke", action="store_true", help="2 prompts × 1, 2 steps: checks the wiring only")
    parser.add_argument(
        "--weights", help="a folder with the world's weights (default reference_model/weights)"
    )
    args = parser.parse_args()
    if args.weights:
        fg_world.WEIGHTS_DIR = Path(args.weights)
    if args.smoke:
        for key, value in SETTINGS.items():
            SETTINGS[key] = Settings(
                steps=2, cfg=value.cfg, sampler=value.sampler, scheduler=value.scheduler, prompts=2, repeat=1
            )
    import torch

    torch.set_num_threads(args.threads)
    start = time.time()
    try:
        results = run(args.only, args.pipelines)
    except Exception:
        traceback.print_exc()
        raise
    out = {
        "models": models_record(),
        "setup": {p: vars(SETTINGS[p]) | {"seed": SEED} for p in PIPELINES},
        "rows": results["rows"],
        "refused": results["refused"],
        "seconds": round(time.time() - start, 1),
    }
    target = Path(args.out)
    target.mkdir(parents=True, exist_ok=True)
    if args.merge and (target / "world.json").exists():
        done = set(args.pipelines or PIPELINES)
        old = json.loads((target / "world.json").read_text())
        out["rows"] = [r for r in old["rows"] if r["pipeline"] not in done] + out["rows"]
        out["refused"] = [r for r in old["refused"] if r["pipeline"] not in done] + out["refused"]
        out["rows"].sort(key=lambda r: PIPELINES.index(r["pipeline"]))
        out["runs"] = old.get(
            "runs", [{"pipelines": sorted(set(PIPELINES) - done), "seconds": old["seconds"]}]
        )
    out.setdefault("runs", []).append(
        {"pipelines": sorted(args.pipelines or PIPELINES), "seconds": out["seconds"]}
    )
    (target / "world.json").write_text(json.dumps(out, indent=1))
    (target / "world.md").write_text(markdown(out))
    plot(out, target / "world.png")
    print(markdown(out))
    print(f"wrote {target}/world.{{json,md,png}} in {out['seconds']:.0f}s")


if __name__ == "__main__":
    main()
