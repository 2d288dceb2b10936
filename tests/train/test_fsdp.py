"""FSDP training (TrainConfig(fsdp=True)): 2 gloo processes with the LLM sharded == 1 process with the
same global batch, through a checkpoint and a resume; the LLM really is sharded on each rank; the
CLI refuses --fsdp (flag or config file) without torchrun. One sample is undecodable, so in one step a
rank has nothing to run and must still join FSDP's all-gathers (with a zero-weight stand-in batch).

The 2-process part runs this file as a torchrun script (`_worker`), so one launch covers training,
saving, resuming and the shard measurements; the reference run happens in the pytest process."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sam_fast
from sam_fast import SAM, SAMConfig
from sam_fast.data import AnnotationDataset, PromptBuilder, TrainTransform, tiny_tokenizers
from sam_fast.data.synthetic import write_group_captions
from sam_fast.train import TrainConfig, Trainer, latest_checkpoint, load_checkpoint

STEPS, FIRST = 4, 2  # the 2-process run dies after FIRST steps (checkpointed), then resumes to STEPS
DROP = 5  # this sample "fails to decode" (None, as under --skip-bad): its rank runs a zero-weight stand-in


class _Dropping(AnnotationDataset):
    def __getitem__(self, index):
        return None if index == DROP else super().__getitem__(index)


def _trainer(data_dir, out, batch_size, max_steps, dist=None, **kw):
    cfg = SAMConfig.tiny()
    torch.manual_seed(0)
    model = SAM(cfg)
    if dist is not None:
        model.to(dist.device)
    q, llm = tiny_tokenizers()
    ds = _Dropping(data_dir, TrainTransform(cfg.vision_config.image_size), seed=0)
    opts = dict(output_dir=str(out), max_steps=max_steps, batch_size=batch_size, lr=3e-3, warmup_steps=1,
                save_every=FIRST, keep_last=5, progress=False)
    opts.update(kw)
    return Trainer(model, ds, PromptBuilder.for_model(cfg, q, llm), TrainConfig(**opts), dist)


class _Killed(Exception):
    pass


def _worker(data_dir: str, out: str) -> None:
    """One torchrun process: fsdp training killed after FIRST steps, then a fresh model resumes to STEPS."""
    from torch.distributed.tensor import DTensor

    from sam_fast.train import init_from_env

    torch.set_num_threads(1)
    dist = init_from_env("cpu")
    first = _trainer(data_dir, out, 1, STEPS, dist, fsdp=True)
    load = first._load

    def dying_load(idx, epoch):  # "killed" while loading step FIRST + 1 (after the checkpoint of step FIRST)
        if first.step == FIRST:
            raise _Killed
        return load(idx, epoch)

    first._load = dying_load
    shards = {}
    for name, p in first.model.language_model.named_parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        shards[name] = {"dtensor": isinstance(p, DTensor), "local": local.numel(), "full": p.numel(),
                        "local_sum": float(local.double().sum())}
    with contextlib.suppress(_Killed):
        first.train()
    second = _trainer(data_dir, out, 1, STEPS, dist, fsdp=True)
    res = second.train(resume=True)
    rec = {"rank": dist.rank, "shards": shards, "report": second.fsdp, "losses": res.losses,
           "trainable_dtensor": any(isinstance(p, DTensor) for p in second.params)}
    Path(out, f"rank{dist.rank}.json").write_text(json.dumps(rec))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_group_captions(tmp_path_factory.mktemp("fsdp") / "train", n_samples=8, size=32, seed=3)


def _log(out):
    return [json.loads(x) for x in (Path(out) / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_fsdp_two_processes_equal_one(data_dir, tmp_path):
    with socket.socket() as sock:  # a free port: other jobs on the machine may use torchrun too
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    two = tmp_path / "two"
    src = str(Path(sam_fast.__file__).resolve().parent.parent)  # the workers import the sam_fast under test
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           __file__, str(data_dir), str(two)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # the reference (1 process, the same global batch of 2) runs meanwhile
    one = _trainer(data_dir, tmp_path / "one", 2, STEPS).train()
    try:
        stdout, stderr = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        proc.kill()  # torchrun's SIGKILL-free shutdown would wait on the hung workers
        proc.communicate()
        pytest.fail("the 2-process FSDP run hung (ranks out of step in FSDP's all-gathers?)")
    assert proc.returncode == 0, stderr[-3000:]

    # the LLM is sharded: each rank holds about half of every sharded parameter, and the two halves
    # are different pieces (their sums differ for some parameter); only the input embeddings are whole
    ranks = [json.loads((two / f"rank{r}.json").read_text()) for r in (0, 1)]
    reference = SAM(SAMConfig.tiny()).language_model
    full = {n: p.numel() for n, p in reference.named_parameters()}
    for rec in ranks:
        sh = rec["shards"]
        assert {n: s["full"] for n, s in sh.items()} == full
        assert [n for n, s in sh.items() if not s["dtensor"]] == ["model.embed_tokens.weight"]
        for n, s in sh.items():
            if s["dtensor"]:
                assert abs(s["local"] - s["full"] / 2) <= s["full"] / 2 / reference.get_parameter(n).shape[0] + 1e-9, n
        embed = full["model.embed_tokens.weight"]
        held = sum(s["local"] for s in sh.values())
        assert held == pytest.approx((sum(full.values()) - embed) / 2 + embed, rel=0.02)
        assert rec["report"]["llm_local_parameters"] == held and rec["report"]["llm_parameters"] == sum(full.values())
        assert rec["report"]["replicated"] == ["model.embed_tokens.weight"]
        assert not rec["trainable_dtensor"]  # the trainable modules stay plain, replicated tensors
    assert any(ranks[0]["shards"][n]["local_sum"] != ranks[1]["shards"][n]["local_sum"]
               for n, s in ranks[0]["shards"].items() if s["dtensor"])

    # the losses of the 2-process FSDP run (through a checkpoint and a resume) equal 1 process's
    ref, log = _log(tmp_path / "one"), _log(two)
    assert [r["step"] for r in log] == list(range(1, STEPS + 1)) and log[0]["samples"] == 2
    assert len(one.losses) == STEPS and ranks[0]["losses"] == ranks[1]["losses"] == [r["loss"] for r in log[FIRST:]]
    for a, b in zip(ref, log, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    # ... and so do the trainable tensors after the steps (the checkpoints hold only those)
    t1, s1 = load_checkpoint(latest_checkpoint(tmp_path / "one" / "checkpoints"))
    t2, s2 = load_checkpoint(latest_checkpoint(two / "checkpoints"))
    assert s1["step"] == s2["step"] == STEPS and s2["config"]["fsdp"] and s2["world_size"] == 2
    torch.manual_seed(0)
    init = SAM(SAMConfig.tiny()).trainable_state_dict()
    assert sorted(t1) == sorted(t2) == sorted(init)
    for k in t1:
        assert not torch.equal(t1[k], init[k]), k  # the steps moved every trainable tensor
        torch.testing.assert_close(t2[k], t1[k], rtol=1e-4, atol=1e-6)


def test_fsdp_refused_without_torchrun(data_dir, tmp_path, monkeypatch):
    from sam_fast.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    base = ["train", "--config", "tiny", "--data", str(data_dir), "--output", str(tmp_path / "o"), "--no-progress"]
    with pytest.raises(SystemExit, match="torchrun --nproc_per_node N"):
        main(base + ["--fsdp"])
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"model": "tiny", "fsdp": True, "max_steps": 1}))
    with pytest.raises(SystemExit, match="--fsdp shards the LLM"):
        main(["train", "--config", str(cfg), "--data", str(data_dir), "--output", str(tmp_path / "p"), "--no-progress"])
    # the Python API refuses too
    with pytest.raises(ValueError, match="torchrun"):
        _trainer(data_dir, tmp_path / "q", 2, 1, fsdp=True)


if __name__ == "__main__":
    from sam_fast.distributed import exit_process, leave_process_group

    _worker(sys.argv[1], sys.argv[2])
    leave_process_group()
    exit_process(0)  # not a normal exit: FSDP's gloo threads outlive the group (tests/test_distributed.py)
