"""Writes fingerprints of the visual tokens `SAM.encode_images` gave before its W-stream
schedules became classes (`sam_fast.modules.schedules`), for `tests/models/test_encode_images.py`.

Three paths, on batches of 1, 2, 3 images and a ragged [3, 1, 2]: shared mode, leave_one_out with
the merged K/V materialised (the CPU default), and leave_one_out with the K/V mixed inside the
fused attention kernel (Triton's CPU interpreter, the kernel allowed on CPU tensors). The models
are tiny random SAMs drawn from fixed seeds; a fingerprint is the tokens [T, Q, H] times a fixed
random vector of H, in float64: [T, Q] numbers per batch.

Recorded at commit 68d780d (the schedules chosen per call by probing the attention op):

    PYTHONPATH=. TRITON_INTERPRET=1 python tests/golden/encode_images_schedules_oracle.py \
        > tests/golden/encode_images_schedules.json
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the model helpers
from _sam_helpers import ragged_batch, randomize_guidance, tiny_sam  # noqa: E402

COUNTS = [[1], [2], [3], [3, 1, 2]]
# path -> (context mode, whether the fused kernel may run on CPU tensors under the interpreter)
PATHS = {"shared": ("shared", False), "leave_one_out": ("leave_one_out", False),
         "leave_one_out-kernel": ("leave_one_out", True)}


def model_for(context_mode: str):
    """The tiny SAM of a path: guidance weights drawn, interaction at layers (1, 3)."""
    return randomize_guidance(tiny_sam(context_mode=context_mode, interaction_layers=(1, 3)))


def encode(model, counts) -> torch.Tensor:
    """The model's visual tokens of the random batch of `counts` (no gradient)."""
    feats, ids, mask = ragged_batch(model, counts, pad_sample=0)
    with torch.no_grad():
        return model.encode_images(image_features=feats, image_counts=counts, qformer_input_ids=ids,
                                   qformer_attention_mask=mask)


def fingerprint(tokens: torch.Tensor) -> list:
    """[T, Q] float64: the tokens projected on a fixed random vector."""
    v = torch.randn(tokens.shape[-1], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return (tokens.double() @ v).tolist()


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("set TRITON_INTERPRET=1 (the kernel path runs under Triton's interpreter)")
    ca = importlib.import_module("sam_fast.ops.cross_attention")
    out = {}
    for name, (mode, kernel) in PATHS.items():
        ca._interpreter_allowed = (lambda: True) if kernel else (lambda: False)
        model = model_for(mode)
        out[name] = {str(c): fingerprint(encode(model, c)) for c in COUNTS}
    print(json.dumps({"torch": torch.__version__, "paths": out}, indent=1))


if __name__ == "__main__":
    main()
