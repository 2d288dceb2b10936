"""The one error type of the synthesis pipeline, and the loader of local model folders."""

from __future__ import annotations

from typing import Callable, TypeVar

T = TypeVar("T")


class SynthesisError(ValueError):
    """Bad input or a failed stage; the message is one line naming the sample, file or value."""


def load_local(option: str, path, what: str, load: Callable[[], T]) -> T:
    """`load()` (a model loader reading `path` with ``local_files_only=True``), with a failure
    turned into one `SynthesisError` line naming the command-line `option`, the path and `what`
    could not be loaded. A folder that asks to run its own Python code is refused first
    (`sam_fast.data.paths.refuse_code_in`)."""
    from sam_fast.data.paths import RemoteCodeError, refuse_code_in

    try:
        refuse_code_in(path)
    except RemoteCodeError as e:
        raise SynthesisError(f"{option} {e}") from None
    try:
        return load()
    except (OSError, ValueError) as e:
        raise SynthesisError(f"{option} {path}: cannot load {what} from local files "
                             f"({' '.join(str(e).split())[:200]})") from None
