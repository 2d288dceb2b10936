"""The authors' released SAM checkpoint: a LAVIS InstructBLIP-Vicuna ``.pth`` plus SAM's modules
under the released code's names (``one_2_muliple``, ``multiple_2_one``: "muliple" sic, ``attn``),
trained with ``context_mode="shared"``. `sam_fast.models.loading.lavis` maps the rest of its keys."""

from __future__ import annotations

import re
import warnings

# (released regex, our template), full matches; `lavis` tries them after the InstructBLIP rules
SAM_RULES: list[tuple[str, str]] = [
    (r"Qformer\.bert\.encoder\.one_2_muliple\.0\.(weight|bias)", r"guidance_in.\1"),
    (r"Qformer\.bert\.encoder\.multiple_2_one\.0\.(weight|bias)", r"guidance_out.\1"),
    (r"attn\.(weight|bias)", r"adaptive_adjustment.\1"),
]
_SAM_LAVIS_RE = re.compile(r"Qformer\.bert\.encoder\.(one_2_muliple|multiple_2_one)\.0\..*|attn\.(weight|bias)")


def _released_mode(path, main, config, context_mode: str | None) -> str | None:
    """The context mode to build with: ``"shared"`` for the authors' SAM checkpoint (trained so;
    another requested mode is warned about and replaced), else the requested one."""
    if not (main.kind == "lavis" and any(_SAM_LAVIS_RE.fullmatch(k) for k in main.tensors)):
        return context_mode
    asked = context_mode if context_mode is not None else getattr(config, "context_mode", None)
    if asked is not None and asked != "shared":
        warnings.warn(
            f"{path} is the authors' SAM checkpoint, trained with context_mode='shared'; "
            f"using 'shared' instead of the requested {asked!r}",
            stacklevel=3,  # the caller of from_lavis_checkpoint, as before the split
        )
    return "shared"
