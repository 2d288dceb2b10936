"""Kill a `Trainer` mid-run, as a crash or a signal would, for the resume tests."""

from __future__ import annotations

import pytest


class Killed(Exception):
    """Raised in place of the process dying."""


def train_killed_at(trainer, step: int, exc: type[BaseException] = Killed) -> None:
    """Run `trainer.train()` and raise `exc` while it loads the data of step ``step + 1`` (after
    step `step` finished and was logged; checkpoints as its save schedule made them)."""
    real = trainer._load

    def dying(idx, epoch):
        if trainer.step == step:
            raise exc
        return real(idx, epoch)

    trainer._load = dying
    with pytest.raises(exc):
        trainer.train()
