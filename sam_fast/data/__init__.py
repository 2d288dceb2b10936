"""Data: annotations.json datasets (`sam_fast.data.formats` converts LLaVA, VIST and datasets-style
data into them), the paper's image transforms, tokenisation and the ragged collator."""

from sam_fast.data.dataset import (
    AnnotationDataset,
    Collator,
    DataError,
    Record,
    SkipReport,
    load_records,
    model_inputs,
    sample_generator,
)
from sam_fast.data.pack_plan import PackPlan, PackPlanError
from sam_fast.data.tokenization import (
    PromptBuilder,
    load_tokenizers,
    save_tokenizers,
    tiny_tokenizers,
)
from sam_fast.data.transforms import CLIP_MEAN, CLIP_STD, EvalTransform, TrainTransform, build_transform

__all__ = [
    "AnnotationDataset", "Collator", "DataError", "Record", "SkipReport", "load_records", "model_inputs",
    "sample_generator", "PackPlan", "PackPlanError", "PromptBuilder", "load_tokenizers", "save_tokenizers", "tiny_tokenizers",
    "CLIP_MEAN", "CLIP_STD", "EvalTransform", "TrainTransform", "build_transform",
]
