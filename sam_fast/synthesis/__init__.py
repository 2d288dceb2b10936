"""MmLINK-style training data synthesis (``sam-fast synthesize``): object image groups in, an
``annotations.json`` dataset out. One module per stage, each a replaceable component:

- `segmentation`: `SamSegmenter` (transformers Segment Anything) or `ThresholdSegmenter`;
- `compositing`: `RandomCompositor` (seeded placement, overlap limit, masks and placement records);
- `inpainting`: `DiffusersInpainter` (Stable Diffusion inpainting; ``pip install sam-fast[synthesis]``);
- `captioning`: `SAMCaptioner` (sam_fast's own model);
- `text`: `TransformersTextWriter` or `OpenAITextWriter`, prompts from an editable JSON file;
- `filters`: the quality filters and their recorded decisions;
- `manifest` / `pipeline`: the resumable run (`Synthesizer`).
"""

from sam_fast.synthesis.captioning import DEFAULT_CAPTION_PROMPT, Captioner, SAMCaptioner
from sam_fast.synthesis.compositing import Composite, Compositor, Placement, RandomCompositor
from sam_fast.synthesis.errors import SynthesisError
from sam_fast.synthesis.filters import Decision, FilterConfig
from sam_fast.synthesis.inpainting import DiffusersInpainter, Inpainter
from sam_fast.synthesis.manifest import Manifest
from sam_fast.synthesis.pipeline import (
    PlannedSample,
    SourceGroup,
    SynthesisResult,
    Synthesizer,
    discover_sources,
    plan_samples,
)
from sam_fast.synthesis.segmentation import SamSegmenter, Segmenter, ThresholdSegmenter, largest_component
from sam_fast.synthesis.text import (
    DEFAULT_PROMPTS,
    OpenAITextWriter,
    Prompts,
    TextWriter,
    TransformersTextWriter,
    load_prompts,
)

__all__ = [
    "DEFAULT_CAPTION_PROMPT", "Captioner", "SAMCaptioner", "Composite", "Compositor", "Placement", "RandomCompositor",
    "SynthesisError", "Decision", "FilterConfig", "DiffusersInpainter", "Inpainter", "Manifest", "PlannedSample",
    "SourceGroup", "SynthesisResult", "Synthesizer", "discover_sources", "plan_samples", "SamSegmenter", "Segmenter",
    "ThresholdSegmenter", "largest_component", "DEFAULT_PROMPTS", "OpenAITextWriter", "Prompts", "TextWriter",
    "TransformersTextWriter", "load_prompts",
]
