"""The model-test helpers of tests/conftest.py (`tiny_sam`, `randomize_guidance`,
`ragged_batch`), importable by file path.

`from conftest import ...` is ambiguous under `pytest tests bench`: both directories have a
conftest.py imported as the module ``conftest`` and the last one loaded (bench's) wins.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("_sam_tests_conftest", Path(__file__).with_name("conftest.py"))
_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_conftest)

tiny_sam = _conftest.tiny_sam
randomize_guidance = _conftest.randomize_guidance
ragged_batch = _conftest.ragged_batch

__all__ = ["ragged_batch", "randomize_guidance", "tiny_sam"]
