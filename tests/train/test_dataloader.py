"""Trainer data loading: DataLoader workers (same run as in-process loading, bit-exact resume, skipped samples
and data errors reported from the workers), per-sample RNG seeding, CPU thread limit, TensorBoard / wandb."""

import importlib.machinery
import json
import os
import sys
import types

import pytest
import torch

from sam_fast import SAM, SAMConfig
from sam_fast.data import AnnotationDataset, DataError, PromptBuilder, TrainTransform, tiny_tokenizers
from sam_fast.data.synthetic import write_group_captions
from sam_fast.train import TrainConfig, Trainer, latest_checkpoint, load_checkpoint


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_group_captions(tmp_path_factory.mktemp("ds") / "train", n_samples=12, size=32, seed=3)


class PidDataset(AnnotationDataset):
    """Records which process read each item (one file per process) and adds noise from the global RNG, so
    items depend on how the global RNG was seeded when they were read."""

    def __init__(self, *a, pid_dir, **k):
        super().__init__(*a, **k)
        self.pid_dir = pid_dir

    def __getitem__(self, index):
        (self.pid_dir / str(os.getpid())).touch()
        item = super().__getitem__(index)
        if item is not None:
            item["pixel_values"] = item["pixel_values"] + 0.1 * torch.randn(item["pixel_values"].shape)
        return item


def _setup(data_dir, out, dataset_cls=AnnotationDataset, ds_kw=None, **kw):
    cfg = SAMConfig.tiny()
    torch.manual_seed(0)
    model = SAM(cfg)
    pb = PromptBuilder.for_model(cfg, *tiny_tokenizers())
    ds = dataset_cls(data_dir, TrainTransform(cfg.vision_config.image_size), seed=0, **(ds_kw or {}))
    opts = dict(output_dir=str(out), max_steps=5, batch_size=4, lr=3e-3, warmup_steps=2, save_every=2,
                keep_last=3, progress=False)
    opts.update(kw)
    return Trainer(model, ds, pb, TrainConfig(**opts))


def _log(out):
    return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]


class Killed(Exception):
    pass


def _kill_at(trainer, step):
    """Make `trainer` die while it receives the data of step ``step + 1``."""
    real = trainer._receive

    def dying(got, idx):
        if trainer.step == step:
            raise Killed
        return real(got, idx)

    trainer._receive = dying


def test_workers_give_the_same_run_and_resume_bit_exactly(data_dir, tmp_path):
    ref = _setup(data_dir, tmp_path / "w0", PidDataset, {"pid_dir": tmp_path}).train()
    assert (tmp_path / str(os.getpid())).exists()  # num_workers=0: read in this process
    for p in tmp_path.iterdir():
        if p.name.isdigit():
            p.unlink()
    two = _setup(data_dir, tmp_path / "w2", PidDataset, {"pid_dir": tmp_path}, num_workers=2)
    got = two.train()
    pids = {p.name for p in tmp_path.iterdir() if p.name.isdigit()}
    assert len(pids) == 2 and str(os.getpid()) not in pids  # two loader processes read every item
    assert got.losses == ref.losses  # bit for bit: the global RNG is seeded per sample, not per worker
    a, _ = load_checkpoint(latest_checkpoint(tmp_path / "w0" / "checkpoints"))
    b, _ = load_checkpoint(latest_checkpoint(tmp_path / "w2" / "checkpoints"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    part = _setup(data_dir, tmp_path / "part", PidDataset, {"pid_dir": tmp_path}, num_workers=2)
    _kill_at(part, 3)  # after checkpoint 2 and log record 3, with step 4's batches prefetched
    with pytest.raises(Killed):
        part.train()
    assert [r["step"] for r in _log(tmp_path / "part")] == [1, 2, 3]
    resumed = _setup(data_dir, tmp_path / "part", PidDataset, {"pid_dir": tmp_path}, num_workers=2)
    resumed.train(resume=True)
    assert [r["loss"] for r in _log(tmp_path / "part")] == ref.losses
    c, _ = load_checkpoint(latest_checkpoint(tmp_path / "part" / "checkpoints"))
    assert all(torch.equal(a[k], c[k]) for k in a)
    assert torch.get_rng_state().numel() > 0  # the training process's RNG is still usable


def test_worker_decode_failures_are_counted_once_and_reported(tmp_path):
    data = write_group_captions(tmp_path / "ds", n_samples=12, size=32, seed=3)
    (data / "images" / "0005_0.png").unlink()  # skipped at open
    (data / "images" / "0003_0.png").write_bytes(b"\x89PNG\r\n\x1a\nnot a png")  # fails only when decoded
    tr = _setup(data, tmp_path / "run", ds_kw={"skip_bad": True, "verify_images": False}, max_steps=3, batch_size=11,
                save_every=3, num_workers=2)
    res = tr.train()  # one step = the whole epoch: the undecodable sample is drawn 3 times, by either worker
    assert res.step == 3 and res.skipped == 2 and tr.collator.dropped == 3
    assert len(tr.dataset.skipped) == 2 and tr.dataset.skipped.items[1][0] == 3
    assert "could not be decoded" in tr.dataset.skipped.items[1][1]
    assert tr.dataset.failed_indices == frozenset({3})


def test_worker_data_error_is_the_one_line_error(tmp_path):
    data = write_group_captions(tmp_path / "ds", n_samples=8, size=32, seed=3)
    (data / "images" / "0002_0.png").write_bytes(b"not an image")
    tr = _setup(data, tmp_path / "run", ds_kw={"verify_images": False}, max_steps=2, batch_size=8, num_workers=2)
    with pytest.raises(DataError, match=r"sample id 2: image file .*0002_0.png could not be decoded") as exc:
        tr.train()
    assert "\n" not in str(exc.value) and "DataLoader worker" not in str(exc.value)


def test_cpu_threads_are_limited_while_training(data_dir, tmp_path):
    torch.set_num_threads(2)  # the autouse fixture restores the session's setting
    seen = []

    def first_forward(*a, **k):
        seen.append(torch.get_num_threads())
        raise Killed

    for name, threads in (("one", 1), ("keep", 0)):
        tr = _setup(data_dir, tmp_path / name, max_steps=1, cpu_threads=threads)
        tr.model.forward = first_forward
        with pytest.raises(Killed):
            tr.train()
        assert torch.get_num_threads() == 2  # restored
    assert seen == [1, 2]
    with pytest.raises(ValueError, match="cpu_threads=-1 must be >= 0"):
        TrainConfig(cpu_threads=-1).validate()
    with pytest.raises(ValueError, match="num_workers=-1 must be >= 0"):
        TrainConfig(num_workers=-1).validate()


def test_report_to_tensorboard_writes_the_log_scalars(data_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    tr = _setup(data_dir, out, max_steps=3, save_every=3, report_to=("tensorboard",))
    tr.train()
    more = _setup(data_dir, out, max_steps=4, save_every=4, report_to=["tensorboard"])
    with pytest.warns(UserWarning, match="max_steps"):
        more.train(resume=True)
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert {"train/loss", "train/lr", "train/grad_norm", "train/samples_per_s"} <= set(acc.Tags()["scalars"])
    events = acc.Scalars("train/loss")
    log = _log(out)
    assert [e.step for e in events] == [1, 2, 3, 4]
    assert [e.value for e in events] == pytest.approx([r["loss"] for r in log], rel=1e-6)


def test_report_to_wandb_logs_offline_through_the_package(data_dir, tmp_path, monkeypatch):
    calls = {"log": [], "finish": 0}

    class Run:
        def log(self, values, step):
            calls["log"].append((step, values))

        def finish(self):
            calls["finish"] += 1

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kw: calls.update(init=kw) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    _setup(data_dir, tmp_path / "run", max_steps=2, save_every=2, report_to=("wandb",)).train()
    assert calls["init"]["config"]["max_steps"] == 2 and calls["init"]["dir"] == str(tmp_path / "run")
    assert [s for s, _ in calls["log"]] == [1, 2] and calls["finish"] == 1
    assert calls["log"][0][1]["train/loss"] == _log(tmp_path / "run")[0]["loss"]


def test_report_to_refuses_unknown_or_missing_packages(monkeypatch):
    with pytest.raises(ValueError, match="report_to: 'mlflow' is not one of 'tensorboard', 'wandb'"):
        TrainConfig(report_to=("mlflow",)).validate()
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match=r"report_to 'wandb' needs the wandb package.*pip install wandb"):
        TrainConfig(report_to=("wandb",)).validate()
