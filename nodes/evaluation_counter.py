"""Nodes that count the network evaluations of a sampling run and report them.

``Count Network Evaluations`` installs the pack's counter on a clone of the model (place it first, before the
guidance nodes, so it sees every pass they add). ``Network Evaluation Report`` runs after the sampler and
puts the counts of the last run into the prompt's outputs: the history for headless users, the UI for editors.
"""

from __future__ import annotations

from . import toolkit
from .common import CATEGORY, MODEL
from .host import counter as eval_counter
from .host import telemetry
from .host.inputs import Input, Inputs, declare

COUNT_INPUTS = Inputs("Count Network Evaluations", [MODEL])


@declare
class CountNetworkEvaluations:
    DESCRIPTION = (
        "Count the diffusion model's network evaluations (conditional, unconditional and extra guidance passes) "
        "of every sampling run that uses this model. Read the counts with Network Evaluation Report."
    )
    CATEGORY = CATEGORY + "/diagnostics"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The same model, with an evaluation counter attached.",)
    FUNCTION = "patch"

    INPUTS = COUNT_INPUTS

    def patch(self, model):
        patched = model.clone()
        eval_counter.EvalCounter.install(patched)
        # The telemetry hub lives here too, so every guidance node and sampler downstream reports into the
        # lineage the report node reads, whichever model of it the report is given.
        telemetry.TelemetryHub.ensure(patched)
        return (patched,)


REPORT_INPUTS = Inputs(
    "Network Evaluation Report",
    [
        Input("model", "MODEL", "The counted model (output of Count Network Evaluations or later)."),
        Input("latent", "LATENT", "The sampler's output; makes the report run after sampling."),
    ],
)


@declare
class NetworkEvaluationReport:
    DESCRIPTION = (
        "Report the network evaluations of the last sampling run of a model that went through Count Network "
        "Evaluations, and the per-step guidance telemetry of the pack's guidance nodes on that model (kept in "
        "the prompt's history as free_guidance_telemetry). Connect the sampler's LATENT output so the report runs after sampling; the latent passes "
        "through unchanged."
    )
    CATEGORY = CATEGORY + "/diagnostics"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The input latent, unchanged.",)
    FUNCTION = "report"
    OUTPUT_NODE = True

    INPUTS = REPORT_INPUTS

    def report(self, model, latent):
        counter = eval_counter.EvalCounter.of(model)
        if counter is None:
            raise toolkit.GuidanceInputError(
                "Network Evaluation Report",
                "model",
                "has no evaluation counter: put a Count Network Evaluations node before the sampler's model input",
            )
        counts = counter.last.as_dict() if counter.last is not None else eval_counter.RunCounts().as_dict()
        text = f"{counts['total']} evaluations: {counts['cond']} cond, {counts['uncond']} uncond"
        if counts["extra"]:
            text += ", " + ", ".join(f"{n} {name}" for name, n in counts["extra"].items())
        if counts.get("backward"):
            text += "; backward: " + ", ".join(f"{n} {name}" for name, n in counts["backward"].items())
        ui = {"free_guidance_evaluations": [counts], "text": [text]}
        records = telemetry.records(model)
        if records:
            ui["free_guidance_telemetry"] = records
        return {"ui": ui, "result": (latent,)}


NODE_CLASS_MAPPINGS = {
    "FreeGuidanceCountEvaluations": CountNetworkEvaluations,
    "FreeGuidanceEvaluationReport": NetworkEvaluationReport,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FreeGuidanceCountEvaluations": "Count Network Evaluations (Free Guidance)",
    "FreeGuidanceEvaluationReport": "Network Evaluation Report (Free Guidance)",
}
