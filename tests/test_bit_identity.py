"""Every node at its defaults gives the output latent (sha256) and evaluation counts recorded before the host
layer refactor (tiny SD1.5, SD3, Flux, Wan 2.1; fixed seeds); on a CPU whose float kernels round differently, the
recorded latent within float rounding (``bit_identity.TOLERANCE``). Record with ``python -m
fg_testing.bit_identity``."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
from fg_testing import bit_identity

RECORDED = json.loads(bit_identity.HASHES_FILE.read_text())
LATENTS = safetensors.torch.load_file(str(bit_identity.LATENTS_FILE))


def test_every_node_is_recorded(pack):
    assert bit_identity.RECORDED_NODES <= set(pack.NODE_CLASS_MAPPINGS)  # node ids unchanged
    assert set(RECORDED) == {f"{node}/{family}" for node, family in bit_identity.cases(pack)}
    assert sum("sha256" in case for case in RECORDED.values()) > 30
    assert set(LATENTS) == {case for case, record in RECORDED.items() if "sha256" in record}


@pytest.mark.parametrize("case", sorted(RECORDED))
def test_output_matches_the_recorded_hash(pack, case):
    node_id, family = case.split("/")
    record, samples = bit_identity.run_case(pack, node_id, family)
    expected = RECORDED[case]
    if "sha256" not in expected or record.get("sha256") == expected["sha256"]:
        assert record == expected
        return
    assert record.get("counts") == expected["counts"], (record, expected)
    matches, difference = bit_identity.latent_matches(samples, LATENTS[case])
    assert matches, f"{case}: the latent differs from the recorded one by {difference:.3g} of its range"


def test_the_latent_check_fails_on_a_changed_output():
    latent = LATENTS[sorted(LATENTS)[0]]
    assert bit_identity.latent_matches(latent.clone(), latent) == (True, 0.0)
    changed = latent.clone()
    changed.view(-1)[0] += 1e-3 * float(latent.abs().max())
    assert not bit_identity.latent_matches(changed, latent)[0]
    assert not bit_identity.latent_matches(latent[..., :-1], latent)[0]
