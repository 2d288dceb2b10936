"""One dispatcher for every op: picks a backend and can say why.

Each op registers its backends in order of preference. A backend is a name, an implementation and
a ``check(*args, **kwargs) -> str | None`` that returns ``None`` when it can run these inputs and
otherwise the reason it cannot. `choose` walks the list and takes the first that can run;
``SAM_FAST_BACKEND=<name>`` forces one backend for every op that has it and raises
`BackendUnavailable` (listing every reason) when it cannot run. `explain()` reports, for a
representative CPU input of each op, the backend that would be used and why the others were not,
which is what ``sam-fast env`` prints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

ENV_VAR = "SAM_FAST_BACKEND"


def forced_backend() -> str:
    """The backend forced through ``SAM_FAST_BACKEND`` ("" when none)."""
    return os.environ.get(ENV_VAR, "").strip()


def usable_table(reasons: dict[str, str | None]) -> dict[str, str]:
    """`OpDispatcher.reasons` as ``{backend: "usable" or why not}`` (what ``sam-fast env`` prints)."""
    return {k: ("usable" if v is None else v) for k, v in reasons.items()}


class BackendUnavailable(RuntimeError):
    """Raised when a forced backend cannot run the given inputs; the message lists the reasons."""


@dataclass
class Backend:
    name: str
    impl: Callable
    check: Callable[..., str | None]


@dataclass
class OpDispatcher:
    """The backends of one op, in order of preference, plus a sample input for `explain`."""

    op: str
    backends: list[Backend] = field(default_factory=list)
    sample: Callable[[], tuple[tuple, dict]] | None = None

    def register(self, name: str, impl: Callable, check: Callable[..., str | None]) -> None:
        self.backends = [b for b in self.backends if b.name != name]
        self.backends.append(Backend(name, impl, check))

    def reasons(self, *args, **kwargs) -> dict[str, str | None]:
        """Backend name -> None if it can run these inputs, else why not."""
        out = {}
        for b in self.backends:
            try:
                out[b.name] = b.check(*args, **kwargs)
            except Exception as exc:  # a broken check must not take the op down
                out[b.name] = f"check failed: {type(exc).__name__}: {exc}"
        return out

    def choose(self, *args, **kwargs) -> Backend:
        forced = forced_backend()
        if forced and any(b.name == forced for b in self.backends):
            backend = next(b for b in self.backends if b.name == forced)
            why = backend.check(*args, **kwargs)
            if why is not None:
                raise BackendUnavailable(
                    f"{ENV_VAR}={forced} was requested for op {self.op!r} but it cannot run: {why}. "
                    f"All backends: {self._fmt(self.reasons(*args, **kwargs))}"
                )
            return backend
        for b in self.backends:
            if b.check(*args, **kwargs) is None:
                return b
        raise BackendUnavailable(f"no backend of {self.op!r} can run: {self._fmt(self.reasons(*args, **kwargs))}")

    def __call__(self, *args, **kwargs):
        return self.choose(*args, **kwargs).impl(*args, **kwargs)

    @staticmethod
    def _fmt(reasons: dict[str, str | None]) -> str:
        return "; ".join(f"{k}: {'ok' if v is None else v}" for k, v in reasons.items())


_REGISTRY: dict[str, OpDispatcher] = {}


def dispatcher(op: str) -> OpDispatcher:
    """The dispatcher of `op`, created on first use."""
    if op not in _REGISTRY:
        _REGISTRY[op] = OpDispatcher(op)
    return _REGISTRY[op]


def explain() -> dict[str, dict]:
    """For each op: {"backend": chosen name (or "error: ..."), "reasons": {backend: why}} on the
    op's representative CPU sample input. Never raises."""
    import sam_fast.ops  # noqa: F401  (registers every op)

    report = {}
    for name, d in _REGISTRY.items():
        args, kwargs = d.sample() if d.sample else ((), {})
        reasons = usable_table(d.reasons(*args, **kwargs))
        try:
            chosen = d.choose(*args, **kwargs).name
        except BackendUnavailable as exc:
            chosen = f"error: {exc}"
        if os.environ.get(ENV_VAR):
            reasons["_forced"] = f"{ENV_VAR}={os.environ[ENV_VAR]}"
        report[name] = {"backend": chosen, "reasons": reasons}
    return report
