"""Stage 4, captioning: describe the main object with sam_fast's own model.

`Captioner` is the replaceable interface; `SAMCaptioner` asks a `sam_fast.SAM` one single-image question
(``prompt``, default `DEFAULT_CAPTION_PROMPT`) through `sam_fast.eval.answer`. Loaded from an HF
InstructBLIP directory (`SAM.from_instructblip`: the guidance modules start at zero, so the model answers
as InstructBLIP does), or any directory `sam-fast generate --model` accepts, or given in memory.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from PIL import Image

from sam_fast.synthesis.errors import SynthesisError

DEFAULT_CAPTION_PROMPT = "{image#1} Describe the main object in this image in detail."


@runtime_checkable
class Captioner(Protocol):
    """Describes the main object of one image."""

    def caption(self, image: Image.Image) -> str: ...

    def describe(self) -> dict: ...


class SAMCaptioner:
    """Caption with a `sam_fast.SAM`.

    Args:
        model: the SAM (in eval mode after construction).
        prompt_builder: its `sam_fast.data.PromptBuilder` (`sam_fast.models.directory.prompt_builder`).
        prompt: the instruction; must refer to the image as ``{image#1}``.
        generate_kwargs: passed to `SAM.generate` (default: the model's generation settings, up to 64 new tokens).
        name: the model name recorded in the manifest.
    """

    def __init__(self, model, prompt_builder, prompt: str = DEFAULT_CAPTION_PROMPT, generate_kwargs: dict | None = None,
                 name: str = "sam"):
        from sam_fast.data.dataset import text_problem

        if "{image#1}" not in prompt:
            raise SynthesisError(f"caption prompt {prompt!r} must refer to the image as {{image#1}}")
        problem = text_problem("instruction", prompt)
        if problem:
            raise SynthesisError(f"caption prompt: {problem}")
        self.model, self.prompt_builder, self.prompt, self.name = model.eval(), prompt_builder, prompt, name
        self.generate_kwargs = {"generation_mode": "lavis", "max_new_tokens": 64} if generate_kwargs is None \
            else dict(generate_kwargs)

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None, **kwargs) -> SAMCaptioner:
        """Load an HF InstructBLIP directory (through `SAM.from_instructblip`), a SAM directory or a training
        output, with its tokenizers, from local files."""
        from sam_fast.models import directory

        try:
            model, tokenizers, _ = directory.load_model_dir(path, **({"dtype": dtype} if dtype is not None else {}))
        except (OSError, ValueError) as e:
            raise SynthesisError(f"--caption-model {path}: {' '.join(str(e).split())[:300]}") from None
        if device is not None:
            model.to(device)
        return cls(model, directory.prompt_builder(model, tokenizers), name=str(path), **kwargs)

    def caption(self, image: Image.Image) -> str:
        """The model's answer to the caption prompt about `image`."""
        from sam_fast.eval import answer

        return answer(self.model, self.prompt_builder, [image], self.prompt, **self.generate_kwargs).strip()

    def describe(self) -> dict:
        """What the manifest records about this stage."""
        return {"kind": "sam_fast", "model": self.name, "prompt": self.prompt,
                "generate": {k: v for k, v in self.generate_kwargs.items() if isinstance(v, (int, float, str))}}
