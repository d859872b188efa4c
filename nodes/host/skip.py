"""The SKIP contract: techniques that skip or replace the unconditional pass (CFG Interval, Adaptive Guidance,
LinearAG, CFG Schedule's weight-1 steps).

A technique supplies its policy, ``should_skip(ctx)`` per main cond/uncond call, optionally ``fill(ctx, cond)``
(what replaces the skipped uncond; default ``D_c``, so CFG returns ``D_c``), ``after_pass(ctx, out, skipped)``
for its own run state, and ``fields(ctx, outcome)`` for its own telemetry fields. The installer owns the
CALC_COND_BATCH wrapper (``passes.install_uncond_skip``: main call only, stacking, filled-slot marking) and the
telemetry of every main call: ``outcome`` is "ran" (the uncond really ran: scale = the run's cfg, ``cosine_x0``),
"skipped" (this technique skipped it: scale 1, or what ``fields`` says) or "inner" (another skip wrapper inside
this one filled the slot: conditional-only, scale 1).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import guiders, passes, telemetry

Fields = Callable[[passes.PassContext, str], dict]


def install_skip(
    model_patcher,
    key: str,
    should_skip: Callable[[passes.PassContext], bool],
    *,
    title: str,
    node_id=None,
    fill: Callable[[passes.PassContext, torch.Tensor], torch.Tensor] | None = None,
    after_pass: Callable[[passes.PassContext, list, bool], None] | None = None,
    fields: Fields | None = None,
) -> None:
    """Install the skip policy on ``model_patcher`` (a clone) with its telemetry for node ``node_id``."""
    guiders.install_guard(model_patcher, title, guiders.TWO_COND, key)
    telemetry.enable(model_patcher, node_id, title)

    def record(ctx: passes.PassContext, out: list, skipped: bool) -> None:
        if after_pass is not None:
            after_pass(ctx, out, skipped)
        if node_id is None:
            return
        real = not skipped and passes.uncond_evaluated(out)
        outcome = "ran" if real else ("skipped" if skipped else "inner")
        if real:
            base = {
                "ran": ["cond", "uncond"],
                "scale": telemetry.run_cfg(ctx.model_options, node_id),
                "cosine_x0": telemetry.cosine(out[0], out[1]),
            }
        else:
            base = {"ran": ["cond"], "skipped": ["uncond"], "scale": 1.0}
        own = fields(ctx, outcome) if fields is not None else {}
        telemetry.record(ctx.model_options, node_id, sigma=ctx.sigma, **{**base, **own})

    hook = record if (after_pass is not None or node_id is not None) else None
    passes.install_uncond_skip(model_patcher, key, should_skip, fill=fill, after_pass=hook)
