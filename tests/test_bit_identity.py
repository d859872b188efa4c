"""Every node at its defaults gives the output latent (sha256) and evaluation counts recorded before the host
layer refactor (tiny SD1.5, SD3, Flux, Wan 2.1; fixed seeds). Record with ``python -m fg_testing.bit_identity``."""

from __future__ import annotations

import json

import pytest
from fg_testing import bit_identity

RECORDED = json.loads(bit_identity.HASHES_FILE.read_text())


def test_every_node_is_recorded(pack):
    assert bit_identity.RECORDED_NODES <= set(pack.NODE_CLASS_MAPPINGS)  # node ids unchanged
    assert set(RECORDED) == {f"{node}/{family}" for node, family in bit_identity.cases(pack)}
    assert sum("sha256" in case for case in RECORDED.values()) > 30


@pytest.mark.parametrize("case", sorted(RECORDED))
def test_output_matches_the_recorded_hash(pack, case):
    node_id, family = case.split("/")
    assert bit_identity.run_case(pack, node_id, family) == RECORDED[case]
