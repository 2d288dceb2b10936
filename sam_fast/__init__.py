"""sam_fast: a fast SAM (Semantic Alignment for Multimodal LLMs, MM '24) for training and generation.

    >>> import sam_fast
    >>> model = sam_fast.SAM(sam_fast.SAMConfig.tiny())

Data flows _kernels/csrc -> `sam_fast.ops` -> `sam_fast.modules` -> `sam_fast.models`.
"""

__version__ = "0.1.0"

from sam_fast.config import SAMConfig  # noqa: E402
from sam_fast.models import SAM, SAMOutput  # noqa: E402
from sam_fast.processing import SAMImageProcessor, SAMProcessor  # noqa: E402

__all__ = ["SAM", "SAMConfig", "SAMImageProcessor", "SAMOutput", "SAMProcessor", "__version__"]
