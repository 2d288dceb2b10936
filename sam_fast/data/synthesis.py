"""Deprecated: training data synthesis moved to `sam_fast.synthesis` (an application beside
`sam_fast.train` and `sam_fast.eval`: its captioner runs the model, so it cannot sit in the data layer).

This module re-exports that package, and its stage modules under their old names
(``sam_fast.data.synthesis.errors`` is ``sam_fast.synthesis.errors``, the same module object, so the
same classes), warning once on import. It is the only module of `sam_fast.data` that imports a later
layer, and it imports nothing else of sam_fast.
"""

import sys
import warnings

import sam_fast.synthesis as _synthesis
from sam_fast.synthesis import *  # noqa: F403  (the old public names)
from sam_fast.synthesis import (  # noqa: F401  (the old stage modules)
    captioning,
    compositing,
    errors,
    filters,
    inpainting,
    manifest,
    pipeline,
    segmentation,
    text,
)

__all__ = _synthesis.__all__

warnings.warn("sam_fast.data.synthesis moved to sam_fast.synthesis; import it from there",
              DeprecationWarning, stacklevel=2)

# `import sam_fast.data.synthesis.errors` finds the moved module instead of loading a second copy
for _stage in (captioning, compositing, errors, filters, inpainting, manifest, pipeline, segmentation, text):
    sys.modules[f"{__name__}.{_stage.__name__.rsplit('.', 1)[1]}"] = _stage
