"""Stage 3, inpainting: paint each canvas's background from a text description.

`Inpainter` is the replaceable interface; `DiffusersInpainter` runs diffusers'
`StableDiffusionInpaintPipeline` (the optional dependency ``pip install sam-fast[synthesis]``), loaded from
a local directory only. White pixels of the mask are repainted; the objects are kept by the model (the
"object changed" filter measures how well).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from PIL import Image

from sam_fast.synthesis.errors import SynthesisError, load_local


@runtime_checkable
class Inpainter(Protocol):
    """Repaints the white region of `mask` in `image` following `prompt`, deterministically from `seed`."""

    def inpaint(self, image: Image.Image, mask: Image.Image, prompt: str, seed: int) -> Image.Image: ...

    def describe(self) -> dict: ...


class DiffusersInpainter:
    """diffusers' Stable Diffusion inpainting.

    Args:
        pipeline: a `diffusers.StableDiffusionInpaintPipeline` (or one with the same call signature).
        steps: denoising steps (50 is the usual setting).
        guidance_scale: classifier-free guidance scale.
        negative_prompt: what the background should not show.
        name: the model name recorded in the manifest.
    """

    def __init__(self, pipeline, steps: int = 50, guidance_scale: float = 7.5, negative_prompt: str | None = None,
                 name: str = "stable-diffusion-inpainting"):
        if steps < 1:
            raise SynthesisError(f"inpainting steps {steps} must be >= 1")
        self.pipeline, self.steps, self.guidance_scale = pipeline, int(steps), float(guidance_scale)
        self.negative_prompt, self.name = negative_prompt, name
        if hasattr(pipeline, "set_progress_bar_config"):
            pipeline.set_progress_bar_config(disable=True)  # the synthesis stage has its own bar

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None, **kwargs) -> DiffusersInpainter:
        """Load the pipeline from a local diffusers directory (never downloads; no safety checker is loaded)."""
        try:
            from diffusers import StableDiffusionInpaintPipeline
        except ImportError:
            raise SynthesisError("inpainting needs diffusers: pip install 'sam-fast[synthesis]' "
                                 "(or pip install diffusers)") from None
        pipe = load_local("--inpaint-model", path, "a Stable Diffusion inpainting pipeline",
                          lambda: StableDiffusionInpaintPipeline.from_pretrained(
                              path, local_files_only=True, safety_checker=None, requires_safety_checker=False,
                              **({"torch_dtype": dtype} if dtype is not None else {})))
        if device is not None:
            pipe.to(device)
        return cls(pipe, name=str(path), **kwargs)

    def inpaint(self, image: Image.Image, mask: Image.Image, prompt: str, seed: int) -> Image.Image:
        """The repainted canvas, at the input's size."""
        import torch

        w, h = image.size
        if w % 8 or h % 8:
            raise SynthesisError(f"inpainting needs a canvas whose sides are multiples of 8, got {w}x{h}")
        device = getattr(self.pipeline, "device", torch.device("cpu"))
        gen = torch.Generator(device=device).manual_seed(int(seed))
        out = self.pipeline(prompt=prompt, image=image, mask_image=mask, height=h, width=w,
                            num_inference_steps=self.steps, guidance_scale=self.guidance_scale,
                            negative_prompt=self.negative_prompt, generator=gen, output_type="pil").images[0]
        out = out.convert("RGB")
        return out if out.size == (w, h) else out.resize((w, h), Image.BICUBIC)

    def describe(self) -> dict:
        """What the manifest records about this stage."""
        return {"kind": "diffusers", "model": self.name, "steps": self.steps, "guidance_scale": self.guidance_scale,
                "negative_prompt": self.negative_prompt}
