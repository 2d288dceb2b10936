"""Converters from the formats multi-image data comes in to sam_fast's ``annotations.json`` folders.

- `convert_llava`: LLaVA-style conversation JSON (LLaVA-1.5, LLaVA-NeXT-Interleave, Mantis);
- `convert_hf`: Hugging Face ``datasets``-style rows (any object with ``len`` and ``[i] -> dict``);
  `load_hf_disk` reads a ``save_to_disk`` folder when ``datasets`` is installed (not a dependency);
- `convert_vist`: VIST storytelling (SIS) JSON.

Each writes ``OUTPUT/annotations.json`` (refusing an existing one unless ``overwrite=True``) and the
images under ``OUTPUT/images/``, checks every sample as `sam_fast.data.load_records` will, and returns
a `ConversionReport` of what it wrote and skipped; what all of them share is in `._common`.
``sam-fast convert FORMAT SRC --output OUT`` runs them from the command line.
"""

from sam_fast.data.formats._common import ConversionReport, FormatError
from sam_fast.data.formats.hf import convert_hf, load_hf_disk
from sam_fast.data.formats.llava import convert_llava
from sam_fast.data.formats.vist import VIST_INSTRUCTION, convert_vist

FORMATS = ("llava", "vist", "hf-disk")

__all__ = ["ConversionReport", "FormatError", "FORMATS", "VIST_INSTRUCTION", "convert_hf", "convert_llava",
           "convert_vist", "load_hf_disk"]
