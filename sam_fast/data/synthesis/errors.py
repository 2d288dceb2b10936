"""The one error type of the synthesis pipeline."""

from __future__ import annotations


class SynthesisError(ValueError):
    """Bad input or a failed stage; the message is one line naming the sample, file or value."""
