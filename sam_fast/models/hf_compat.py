"""The transformers names that changed within the versions sam_fast supports (``>=5.17,<6``).

transformers 5.25 renamed the KV-cache argument of its models' ``forward`` and of ``generate``, and
the field of their outputs, from ``past_key_values`` to ``cache``; the old name warns and goes away
(5.40 for ``forward``, 6.0 for ``generate``). sam_fast passes and reads the name the installed
version declares, so neither warns.
"""

from __future__ import annotations

import functools
import inspect

LEGACY_CACHE_NAME = "past_key_values"


@functools.cache
def cache_kwarg() -> str:
    """``"cache"`` where the installed transformers' LLaMA takes it, else ``"past_key_values"``."""
    from transformers import LlamaModel

    return "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else LEGACY_CACHE_NAME


def output_cache(output):
    """The KV cache a model call returned (``output.cache`` or ``output.past_key_values``)."""
    return getattr(output, cache_kwarg())


def passes_cache(kwargs: dict) -> bool:
    """Whether a caller's keyword arguments already carry a KV cache under either name."""
    return "cache" in kwargs or LEGACY_CACHE_NAME in kwargs
