"""Leaving a torchrun run (sam_fast.distributed.leave_process_group / exit_process, sam_fast.cli.run).

FSDP2 keeps the gloo process group's threads alive after destroy_process_group(); one of them dropping
a tensor while the interpreter finalizes aborts the process (SIGABRT, "terminate called without an
active exception") after all its work is done. A torchrun process of ours therefore ends through
exit_process (no finalization). The worker below makes that race likely on purpose: FSDP-sharded
layers, then collectives still running in the gloo threads when the group is destroyed. Ended by a
normal interpreter exit it aborted in 5 of 10 launches (8 of 10 without the destroy); through
exit_process in none of 30."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import sam_fast
from sam_fast import distributed

WORKER = """
import sys
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from sam_fast.distributed import exit_process

dist.init_process_group("gloo")
model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
for layer in model:
    fully_shard(layer, mesh=mesh)
fully_shard(model, mesh=mesh)
model(torch.randn(2, 8)).sum().backward()
for _ in range(50):  # still in the gloo threads when the group goes away: they release these tensors late
    dist.all_reduce(torch.ones(4_000_000), async_op=True)
dist.destroy_process_group()
print("worker done", flush=True)
exit_process(int(sys.argv[1]))
"""


def _torchrun(script: Path, *args: str) -> subprocess.CompletedProcess:
    with socket.socket() as sock:  # a free port: other jobs on the machine may use torchrun too
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    src = str(Path(sam_fast.__file__).resolve().parent.parent)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(script), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_exit_process_ends_ranks_whose_gloo_threads_outlive_the_group(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    for attempt in range(3):  # a normal exit aborts in about half of these launches
        proc = _torchrun(script, "0")
        assert proc.returncode == 0, f"launch {attempt}: {proc.stderr[-2000:]}"
        assert "terminate called" not in proc.stderr
        assert proc.stdout.count("worker done") == 2
    proc = _torchrun(script, "3")  # the exit code gets through
    assert proc.returncode != 0 and "exitcode  : 3" in proc.stderr


class _Exited(Exception):
    def __init__(self, code):
        self.code = code


@pytest.fixture
def exits(monkeypatch):
    """exit_process as the CLI entry calls it, with os._exit recorded instead of ending pytest."""
    ran = []

    def fake_exit(code):
        raise _Exited(code)

    monkeypatch.setattr(os, "_exit", fake_exit)
    monkeypatch.setattr(distributed.atexit, "_run_exitfuncs", lambda: ran.append("atexit"))
    return ran


@pytest.mark.parametrize("outcome, code, printed", [
    (0, 0, ""), (3, 3, ""), (SystemExit(2), 2, ""), (SystemExit(None), 0, ""),
    (SystemExit("error: a one-line refusal"), 1, "error: a one-line refusal"),
    (RuntimeError("boom"), 1, "RuntimeError: boom"),
])
def test_run_ends_a_process_that_left_a_group_through_exit_process(monkeypatch, exits, capsys, outcome, code, printed):
    from sam_fast import cli

    def fake_main():
        distributed._left_group = True  # as leave_process_group records it
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    monkeypatch.setattr(cli, "main", fake_main)
    monkeypatch.setattr(distributed, "_left_group", False)
    with pytest.raises(_Exited) as exc:
        cli.run()
    assert exc.value.code == code and exits == ["atexit"]
    assert printed in capsys.readouterr().err


def test_run_exits_normally_without_a_process_group(monkeypatch, exits):
    from sam_fast import cli

    monkeypatch.setattr(distributed, "_left_group", False)
    monkeypatch.setattr(cli, "main", lambda: 4)
    with pytest.raises(SystemExit) as exc:
        cli.run()
    assert exc.value.code == 4 and exits == []
    monkeypatch.setattr(cli, "main", lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):  # Python prints it as usual
        cli.run()


def test_the_installed_command_is_run():
    import tomllib

    project = tomllib.loads((Path(sam_fast.__file__).resolve().parent.parent / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["sam-fast"] == "sam_fast.cli:run"
