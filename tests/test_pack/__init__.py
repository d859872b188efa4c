"""Custom-node folder that registers the test-only nodes of tests/fg_testing/test_nodes.py."""

import os
import sys

_TESTS_DIR = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

from fg_testing.test_nodes import NODE_CLASS_MAPPINGS  # noqa: E402

__all__ = ["NODE_CLASS_MAPPINGS"]
