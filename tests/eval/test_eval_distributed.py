"""Data-parallel `sam-fast eval` under torchrun: 2 gloo processes split the samples (rank r takes
r, r + 2, ...) and rank 0 writes the same pred.json / eval_score.json / metrics.json as 1 process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sam_fast
from sam_fast.cli import main
from sam_fast.data.synthetic import write_group_captions
from sam_fast.train.distributed import DistInfo, shard_indices

GEN = ["--num-beams", "2", "--max-new-tokens", "8", "--batch-size", "2", "--no-progress", "--skip-bad"]


def test_shard_indices_cover_each_sample_once():
    for n in (0, 1, 5, 8):
        shares = [shard_indices(n, DistInfo(rank=r, world_size=3)) for r in range(3)]
        assert sorted(i for s in shares for i in s) == list(range(n))
        assert shares[1] == list(range(1, n, 3))


@pytest.mark.slow
def test_two_process_eval_equals_one(tmp_path, monkeypatch):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train = write_group_captions(tmp_path / "train", n_samples=4, size=32, seed=1)
        test = write_group_captions(tmp_path / "test", n_samples=6, size=32, seed=2)
        ann = json.loads((test / "annotations.json").read_text())
        (test / ann[4]["img_list"][0]).write_bytes(b"not an image")  # skipped (--skip-bad)
        run = tmp_path / "run"
        assert main(["train", "--config", "tiny", "--data", str(train), "--output", str(run), "--batch-size", "2",
                     "--max-steps", "2", "--lr", "3e-3", "--warmup-steps", "1", "--no-progress"]) == 0
        monkeypatch.delenv("WORLD_SIZE", raising=False)
        assert main(["eval", "--model", str(run), "--data", str(test), "--output", str(tmp_path / "one"), *GEN]) == 0
    finally:
        torch.set_num_threads(n)

    with socket.socket() as sock:  # a free port: other jobs on the machine may use torchrun too
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    src = str(Path(sam_fast.__file__).resolve().parent.parent)  # the workers import the sam_fast under test
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "sam_fast.cli", "eval", "--model", str(run), "--data", str(test), "--output", str(tmp_path / "two"),
           *GEN]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 5 good samples (the bad one is refused when the annotations are read): rank 0 generated 3, rank 1 2
    assert "generated on 2 processes: [3, 2] samples" in proc.stdout
    one, two = tmp_path / "one", tmp_path / "two"
    preds = json.loads((one / "pred.json").read_text())
    assert [p["sample_id"] for p in preds] == [r["id"] for i, r in enumerate(ann) if i != 4]
    assert len({p["pred_response"] for p in preds}) > 1  # the samples get different answers
    for name in ("pred.json", "eval_score.json", "metrics.json"):
        a, b = json.loads((two / name).read_text()), json.loads((one / name).read_text())
        if name == "metrics.json":  # timings differ from run to run; the tokens generated do not
            ta, tb = a.pop("throughput"), b.pop("throughput")
            assert ta["new_tokens"] == tb["new_tokens"] > 0
        assert a == b, name
    assert json.loads((two / "metrics.json").read_text())["skipped"] == 1
