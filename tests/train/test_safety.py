"""Issue 11: checkpoints carry no code, damaged files are named and skipped, non-finite gradients stop
training before they are applied, a partial log line does not block resume, run directories are locked
and protected, SIGINT/SIGTERM save a checkpoint, nonsense numeric options are refused."""

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys

import pytest
import torch
from _killing import train_killed_at

from sam_fast.cli import main
from sam_fast.data import AnnotationDataset, PromptBuilder, TrainTransform, tiny_tokenizers
from sam_fast.data.synthetic import write_group_captions
from sam_fast.train import NonFiniteLossError, TrainConfig, Trainer, latest_checkpoint, load_checkpoint
from sam_fast.train import checkpoint as ckpt

TRAIN = ["--batch-size", "2", "--max-steps", "4", "--save-every", "2", "--lr", "3e-3", "--warmup-steps", "1",
         "--no-progress"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_group_captions(tmp_path_factory.mktemp("safety") / "train", n_samples=8, size=32, seed=5)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """A finished 4-step run (checkpoints at steps 2 and 4); tests copy it before changing it."""
    out = tmp_path_factory.mktemp("safety_run") / "run"
    assert main(["train", "--config", "tiny", "--data", str(data), "--output", str(out), *TRAIN]) == 0
    return out


def _copy(run, tmp_path, name="run"):
    dst = tmp_path / name
    shutil.copytree(run, dst)
    return dst


def _train(data, out, *extra):
    return main(["train", "--config", "tiny", "--data", str(data), "--output", str(out), *TRAIN, *extra])


def _log(out):
    return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]


class _Payload:
    """Unpickling this creates the marker file: what a malicious trainer_state.pt would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant_payload(ck, marker):
    for f in ck.iterdir():
        if f.name.startswith("trainer_state"):
            f.unlink()
    torch.save({"step": 4, "x": _Payload(marker)}, ck / "trainer_state.pt")


# -- 1. no code from checkpoints ------------------------------------------------------------------
def test_pickled_trainer_state_is_never_unpickled(data, run, tmp_path, capsys):
    out = _copy(run, tmp_path)
    marker = tmp_path / "PWNED"
    ck = out / "checkpoints" / "step-00000004"
    _plant_payload(ck, marker)
    with pytest.raises(ckpt.CheckpointError, match=r"trainer_state\.pt.*can run code"):
        load_checkpoint(ck)
    assert not marker.exists()
    # eval/generate/explain load only the safetensors weights of such a checkpoint
    from sam_fast.train.outputs import load_model_dir

    _, _, what = load_model_dir(out)
    assert "step 4" in what and not marker.exists()
    _, _, what = load_model_dir(ck)
    assert "step 4" in what and not marker.exists()
    # resuming from it is refused with one line naming the file
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        _train(data, out, "--resume", "--max-steps", "6")
    msg = str(e.value)
    assert "trainer_state.pt" in msg and "\n" not in msg and not marker.exists()


def test_trainer_state_holds_no_pickle(run):
    ck = latest_checkpoint(run / "checkpoints")
    assert sorted(p.name for p in ck.iterdir()) == ["trainable.safetensors", "trainer_state.json",
                                                    "trainer_state.safetensors"]
    state = json.loads((ck / "trainer_state.json").read_text())  # plain JSON
    assert state["step"] == 4 and set(state["files"]) == {"trainable.safetensors", "trainer_state.safetensors"}
    _, st = load_checkpoint(ck)
    assert isinstance(st["rng"]["python"], tuple) and st["rng"]["numpy"][1].dtype.name == "uint32"
    assert st["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert sorted(st["optimizer"]["state"]) == list(range(8))  # int keys survive


def test_state_round_trip_restores_rng_exactly(tmp_path):
    import random

    import numpy as np

    rng = ckpt.rng_state()
    path = ckpt.save_checkpoint(tmp_path, 1, {"w": torch.ones(2)}, {"rng": rng, "k": {3: (1.5, None, "a")}})
    want = (torch.rand(3), random.random(), np.random.rand(3))
    _, state = load_checkpoint(path)
    assert state["k"] == {3: (1.5, None, "a")}
    ckpt.set_rng_state(state["rng"])
    got = (torch.rand(3), random.random(), np.random.rand(3))
    assert torch.equal(got[0], want[0]) and got[1] == want[1] and np.array_equal(got[2], want[2])


# -- 10. damaged files are named; loading falls back ------------------------------------------------
def test_truncated_trainable_is_named_and_skipped(run, tmp_path, capsys):
    out = _copy(run, tmp_path)
    f = out / "checkpoints" / "step-00000004" / "trainable.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ckpt.CheckpointError, match=r"step-00000004/trainable\.safetensors.*truncated"):
        load_checkpoint(f.parent)
    from sam_fast.train.outputs import load_model_dir

    capsys.readouterr()
    _, _, what = load_model_dir(out)
    assert "step 2" in what
    err = capsys.readouterr().err
    assert "trainable.safetensors" in err and "falling back to step-00000002" in err


def test_bit_flip_is_caught_by_the_checksum_and_resume_falls_back(data, run, tmp_path, capsys):
    out = _copy(run, tmp_path)
    f = out / "checkpoints" / "step-00000004" / "trainer_state.safetensors"
    raw = bytearray(f.read_bytes())
    raw[len(raw) - 7] ^= 0x10
    f.write_bytes(bytes(raw))
    with pytest.raises(ckpt.CheckpointError, match=r"trainer_state\.safetensors: sha256 mismatch"):
        load_checkpoint(f.parent)
    capsys.readouterr()
    assert _train(data, out, "--resume") == 0  # from step 2: steps 3 and 4 again, the same losses
    assert "falling back to step-00000002" in capsys.readouterr().err
    assert [r["loss"] for r in _log(out)] == [r["loss"] for r in _log(run)]


def test_altered_trainer_state_json_is_refused(run, tmp_path):
    out = _copy(run, tmp_path)
    f = out / "checkpoints" / "step-00000004" / "trainer_state.json"
    f.write_text(f.read_text().replace('"step": 4', '"step": 5', 1))
    with pytest.raises(ckpt.CheckpointError, match=r"trainer_state\.json: checksum mismatch"):
        load_checkpoint(f.parent)



def _prune_after_listing(monkeypatch, prune):
    """Run `prune(listed)` once, right after a reader lists the checkpoints: a training process pruning
    (--keep-last) between a reader's listing and its reading."""
    from sam_fast.models import checkpoint_files

    real, calls = checkpoint_files.candidates, []

    def candidates(root):
        listed = real(root)
        if not calls:
            calls.append(listed)
            prune(listed)
        return listed

    monkeypatch.setattr(checkpoint_files, "candidates", candidates)
    return calls


def test_a_checkpoint_pruned_while_a_reader_lists_them_is_not_damage(run, tmp_path, capsys, monkeypatch):
    from sam_fast.train.outputs import load_model_dir

    out = _copy(run, tmp_path)
    calls = _prune_after_listing(monkeypatch, lambda listed: shutil.rmtree(listed[0]))  # the newest, step 4
    capsys.readouterr()
    _, _, what = load_model_dir(out)
    assert calls[0][0].name == "step-00000004" and "step 2" in what
    assert "damaged" not in capsys.readouterr().err


def test_a_reader_finds_the_checkpoint_that_replaced_the_pruned_ones(run, tmp_path, capsys, monkeypatch):
    from sam_fast.train.outputs import load_model_dir

    out = _copy(run, tmp_path)
    root = out / "checkpoints"
    trainable, state = load_checkpoint(root / "step-00000004")

    def save_and_prune(listed):  # a trainer with --keep-last 1 writes step 6, removing steps 2 and 4
        ckpt.save_checkpoint(root, 6, trainable, {**state, "step": 6}, keep_last=1)

    calls = _prune_after_listing(monkeypatch, save_and_prune)
    capsys.readouterr()
    _, _, what = load_model_dir(out)
    assert [p.name for p in calls[0]] == ["step-00000004", "step-00000002"] and "step 6" in what
    assert "damaged" not in capsys.readouterr().err
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000006"]

# -- 5. non-finite gradients ------------------------------------------------------------------------
def _trainer(data, out, **kw):
    from sam_fast import SAM, SAMConfig

    cfg = SAMConfig.tiny()
    torch.manual_seed(0)
    model = SAM(cfg)
    pb = PromptBuilder.for_model(cfg, *tiny_tokenizers())
    ds = AnnotationDataset(data, TrainTransform(cfg.vision_config.image_size), seed=0)
    opts = dict(output_dir=str(out), max_steps=5, batch_size=2, lr=3e-3, warmup_steps=1, save_every=1,
                keep_last=1, progress=False)
    opts.update(kw)
    return Trainer(model, ds, pb, TrainConfig(**opts))


def test_nan_gradient_is_never_applied_nor_checkpointed(data, tmp_path, monkeypatch):
    monkeypatch.setenv("SAM_FAST_BACKEND", "reference")
    tr = _trainer(data, tmp_path / "nan")
    w = tr.model.guidance_in.weight
    w.register_hook(lambda g: g * float("nan") if tr.step == 2 else g)  # step 3's gradient; its loss is finite
    with pytest.raises(NonFiniteLossError, match=r"non-finite gradient.* at step 3 .*after step 2"):
        tr.train()
    assert all(torch.isfinite(p).all() for p in tr.params)  # not applied
    ckpts = sorted(p.name for p in (tmp_path / "nan" / "checkpoints").glob("step-*"))
    assert ckpts == ["step-00000002"]  # --keep-last 1 kept the finite one
    tensors, state = load_checkpoint(latest_checkpoint(tmp_path / "nan" / "checkpoints"))
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in tensors.values())


@pytest.mark.filterwarnings(r"ignore:Seems like `optimizer.step\(\)`")
def test_non_finite_update_stops_without_a_checkpoint(data, tmp_path):
    tr = _trainer(data, tmp_path / "inf")
    real_step = tr.optimizer.step

    def step(*a, **k):
        out = real_step(*a, **k)
        if tr.step == 2:
            with torch.no_grad():
                tr.model.guidance_out.bias.fill_(float("inf"))  # e.g. an overflowing update
        return out

    tr.optimizer.step = step
    with pytest.raises(NonFiniteLossError, match=r"step 3 .*guidance_out\.bias.*step-00000002"):
        tr.train()
    assert sorted(p.name for p in (tmp_path / "inf" / "checkpoints").glob("step-*")) == ["step-00000002"]


def test_save_checkpoint_refuses_non_finite_tensors_and_keeps_the_last_good(tmp_path):
    good = ckpt.save_checkpoint(tmp_path, 1, {"w": torch.ones(3)}, {"step": 1}, keep_last=1)
    with pytest.raises(ValueError, match="trainable tensor w holds NaN"):
        ckpt.save_checkpoint(tmp_path, 2, {"w": torch.tensor([1.0, float("nan"), 0.0])}, {"step": 2}, keep_last=1)
    with pytest.raises(ValueError, match="trainer state tensor"):
        ckpt.save_checkpoint(tmp_path, 2, {"w": torch.ones(3)}, {"m": torch.tensor([float("inf")])}, keep_last=1)
    assert latest_checkpoint(tmp_path) == good and [p.name for p in tmp_path.glob("step-*")] == [good.name]


# -- 6. a partial last log line ---------------------------------------------------------------------
def test_partial_log_line_is_dropped_on_resume(data, run, tmp_path, capsys):
    out = _copy(run, tmp_path)
    shutil.rmtree(out / "checkpoints" / "step-00000004")
    log = out / "log.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:3]) + "\n" + lines[3][:17])  # disk full in the middle of step 4's record
    capsys.readouterr()
    assert _train(data, out, "--resume") == 0
    err = capsys.readouterr().err
    assert "log.jsonl" in err and "partial" in err and len([x for x in err.splitlines() if "log.jsonl" in x]) == 1
    assert [r["loss"] for r in _log(out)] == [r["loss"] for r in _log(run)]


# -- 9. run directories -----------------------------------------------------------------------------
def test_training_into_an_existing_run_needs_resume_or_overwrite(data, run, tmp_path):
    out = _copy(run, tmp_path)
    before = (out / "log.jsonl").read_text()
    with pytest.raises(SystemExit, match=r"already holds a training run.*--resume.*--overwrite"):
        _train(data, out)
    assert (out / "log.jsonl").read_text() == before
    (out / "notes.txt").write_text("mine")
    assert _train(data, out, "--overwrite", "--max-steps", "2", "--seed", "1") == 0
    assert [r["step"] for r in _log(out)] == [1, 2]
    assert json.loads((out / "run.json").read_text())["train"]["seed"] == 1
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-00000002"]
    assert (out / "notes.txt").read_text() == "mine"  # only the run's own files are replaced
    with pytest.raises(SystemExit, match="either --resume .*or --overwrite .*not both"):
        _train(data, out, "--overwrite", "--resume")



def _user_folder(root):
    """A folder of the user's own that happens to hold base/ and tokenizer/ folders."""
    for rel, text in {"base/config.json": "{\"mine\": 1}", "base/mine.bin": "weights of mine",
                      "tokenizer/llm/tokenizer.json": "{}", "notes.txt": "my notes"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


@pytest.mark.parametrize("flags", [(), ("--overwrite",)])
def test_a_folder_that_is_not_a_run_is_refused(data, tmp_path, flags):
    out = _user_folder(tmp_path / "mine")
    before = _snapshot(out)
    with pytest.raises(SystemExit) as e:
        _train(data, out, *flags)
    msg = str(e.value)
    assert msg.startswith(f"sam-fast train: --output {out} is not empty and holds no sam_fast training run "
                          "(base/, notes.txt, tokenizer/)") and "choose an empty or new folder" in msg
    assert "\n" not in msg and _snapshot(out) == before and sorted(p.name for p in out.iterdir()) == [
        "base", "notes.txt", "tokenizer"]  # not even a lock left behind


def test_a_users_log_or_many_files_do_not_make_a_run(data, tmp_path):
    out = tmp_path / "logs"
    out.mkdir()
    for i in range(9):
        (out / f"f{i}.txt").write_text("x")
    (out / "log.jsonl").write_text('{"step": 1}\n')  # someone else's log
    with pytest.raises(SystemExit, match=r"holds no sam_fast training run \(f0\.txt, f1\.txt, f2\.txt, f3\.txt and "
                       r"6 more\)"):
        _train(data, out, "--overwrite")
    assert (out / "log.jsonl").read_text() == '{"step": 1}\n' and len(list(out.iterdir())) == 10



def test_an_output_that_is_a_file_is_refused(data, tmp_path):
    out = tmp_path / "a_file"
    out.write_text("mine")
    with pytest.raises(SystemExit, match=rf"--output {re.escape(str(out))} is a file, not a folder"):
        _train(data, out)
    assert out.read_text() == "mine"

def test_overwrite_removes_only_the_files_the_run_wrote(data, run, tmp_path, capsys):
    out = _copy(run, tmp_path)
    recorded = json.loads((out / "run.json").read_text())["files"]
    assert "base/model.safetensors" in recorded and "tokenizer/llm/tokenizer_config.json" in recorded
    mine = {"notes.txt": "mine", "base/mine.bin": "mine too", "tokenizer/llm/extra.txt": "x",
            "checkpoints/README": "my notes on the checkpoints", "own/deep/file.txt": "y"}
    for rel, text in mine.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(text)
    capsys.readouterr()
    assert _train(data, out, "--overwrite", "--max-steps", "2", "--seed", "1") == 0
    assert all((out / rel).read_text() == text for rel, text in mine.items())
    kept = [x for x in capsys.readouterr().err.splitlines() if "kept" in x]
    assert len(kept) == 1 and "--overwrite kept 5 file(s)" in kept[0] and "base/mine.bin" in kept[0]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["README", "latest", "step-00000002"]
    assert [r["step"] for r in _log(out)] == [1, 2]
    assert json.loads((out / "run.json").read_text())["files"].keys() == recorded.keys()


def _legacy_run_json(out):
    run = json.loads((out / "run.json").read_text())
    run.pop("files", None), run.pop("format", None)  # as an older sam_fast wrote it
    (out / "run.json").write_text(json.dumps(run))


@pytest.mark.parametrize("case", ["changed", "in_a_checkpoint", "older_run_json"])
def test_overwrite_refuses_before_removing_anything_when_a_file_is_in_the_way(data, run, tmp_path, case):
    out = _copy(run, tmp_path)
    if case == "changed":  # a file the run wrote, since replaced by the user's own
        (out / "tokenizer" / "llm" / "tokenizer_config.json").write_text("{}")
        named = "tokenizer/llm/tokenizer_config.json"
    elif case == "in_a_checkpoint":  # the run replaces and prunes checkpoint folders whole
        (out / "checkpoints" / "step-00000002" / "mine.bin").write_text("mine")
        named = "checkpoints/step-00000002/mine.bin"
    else:  # base/ and tokenizer/ recorded nowhere: they cannot be told from the user's
        _legacy_run_json(out)
        named = "base/config.json"
    before = _snapshot(out)
    with pytest.raises(SystemExit) as e:
        _train(data, out, "--overwrite")
    msg = str(e.value)
    assert msg.startswith(f"sam-fast train: --overwrite: {out} holds file(s) where the new run writes that are not "
                          "the run's own (") and named in msg and "nothing was removed" in msg and "\n" not in msg
    assert ("older sam_fast" in msg) == (case == "older_run_json")
    assert _snapshot(out) == before

@pytest.mark.parametrize("flag,value,name", [("--seed", "1", "seed"), ("--context-mode", "shared", "context_mode"),
                                             ("--guidance", "mean", "guidance"), ("--data", None, "data")])
def test_resume_with_other_settings_is_refused(data, run, tmp_path, flag, value, name):
    out = _copy(run, tmp_path)
    run_json = (out / "run.json").read_text()
    if flag == "--data":
        value = str(_copy(data, tmp_path, "other_data"))
    with pytest.raises(SystemExit, match=rf"--resume.*{name}: .* -> .*{os.path.basename(value)}"):
        _train(data, out, "--resume", "--max-steps", "6", flag, value)
    assert (out / "run.json").read_text() == run_json
    assert [r["step"] for r in _log(out)] == [1, 2, 3, 4]


def test_resume_records_changed_options_in_run_json(data, run, tmp_path):
    out = _copy(run, tmp_path)
    with pytest.warns(UserWarning, match="max_steps: 4 -> 6"):
        assert _train(data, out, "--resume", "--max-steps", "6", "--context-mode", "leave_one_out") == 0
    rj = json.loads((out / "run.json").read_text())
    assert rj["train"]["max_steps"] == 6 and rj["history"] == [{"resumed_at_step": 4, "train": {"max_steps": 4}}]



def _snapshot(out):
    """Every file under `out` with its bytes: what a refused command must leave as it was."""
    return {str(f.relative_to(out)): f.read_bytes() for f in sorted(out.rglob("*")) if f.is_file()}


def test_resume_with_another_batch_size_is_refused_before_anything_is_written(data, run, tmp_path):
    out = _copy(run, tmp_path)
    before = _snapshot(out)
    with pytest.raises(SystemExit) as e:
        _train(data, out, "--resume", "--max-steps", "6", "--batch-size", "4")
    msg = str(e.value)
    assert msg.startswith("sam-fast train:") and "\n" not in msg
    assert "global batch of 2 samples; this run has 4" in msg and "step-00000004" in msg
    assert _snapshot(out) == before  # run.json byte for byte: no new settings, no history entry
    tr = _trainer(data, out, max_steps=6, batch_size=4)  # the API: a ValueError, nothing restored
    w = {k: v.clone() for k, v in tr.model.trainable_state_dict().items()}
    with pytest.raises(ValueError, match="global batch of 2 samples; this run has 4"):
        tr.train(resume=True)
    assert all(torch.equal(v, tr.model.trainable_state_dict()[k]) for k, v in w.items())
    assert _snapshot(out) == before


@pytest.mark.parametrize("flag,value,name", [("--seed", "1", "seed"), ("--context-mode", "shared", "context_mode"),
                                             ("--data", None, "data")])
def test_resume_of_checkpoints_without_run_json_checks_their_own_record(data, run, tmp_path, flag, value, name):
    out = tmp_path / "copied"
    shutil.copytree(run / "checkpoints", out / "checkpoints")  # checkpoints copied to a new folder
    before = _snapshot(out)
    if flag == "--data":
        value = str(_copy(data, tmp_path, "other_data"))
    with pytest.raises(SystemExit) as e:
        _train(data, out, "--resume", "--max-steps", "6", flag, value)
    msg = str(e.value)
    assert re.search(rf"--resume with settings that differ from .*step-00000004 \({name}: .* -> .*"
                     rf"{re.escape(os.path.basename(value))}", msg) and "\n" not in msg
    assert _snapshot(out) == before


def test_resume_of_checkpoints_without_run_json_continues_with_the_same_settings(data, run, tmp_path):
    out = tmp_path / "copied"
    shutil.copytree(run / "checkpoints", out / "checkpoints")
    shutil.rmtree(out / "checkpoints" / "step-00000004")
    assert _train(data, out, "--resume") == 0  # steps 3 and 4 again, from step 2
    assert [r["step"] for r in _log(out)] == [3, 4] and [r["loss"] for r in _log(out)] == [
        r["loss"] for r in _log(run)][2:]


def test_resume_with_nothing_to_resume_is_refused(data, tmp_path, capsys):
    for out in (tmp_path / "new", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        with pytest.raises(SystemExit) as e:
            _train(data, out, "--resume")
        msg = str(e.value)
        assert "holds no checkpoint" in msg and "drop --resume" in msg and str(out) in msg and "\n" not in msg
        assert (not out.exists()) if out.name == "new" else not any(out.iterdir())
    from sam_fast.train import RunDirectoryError

    for out in (tmp_path / "empty", tmp_path / "api_new"):  # the API too
        with pytest.raises(RunDirectoryError, match="holds no checkpoint to resume from"):
            _trainer(data, out).train(resume=True)
    assert not (tmp_path / "api_new").exists()
    tr = _trainer(data, tmp_path / "early", max_steps=2, save_every=100)  # stopped before its first checkpoint
    train_killed_at(tr, 1, KeyboardInterrupt)
    capsys.readouterr()
    _trainer(data, tmp_path / "early", max_steps=2, save_every=100).train(resume=True)
    err = [x for x in capsys.readouterr().err.splitlines() if "early" in x]
    assert len(err) == 1 and "no checkpoint yet" in err[0] and "starting from step 0" in err[0]


def test_resume_past_max_steps_is_refused_and_at_max_steps_is_said(data, run, tmp_path, capsys):
    out = _copy(run, tmp_path)  # at step 4
    before = _snapshot(out)
    with pytest.raises(SystemExit) as e:
        _train(data, out, "--resume", "--max-steps", "2")
    msg = str(e.value)
    assert "already at step 4, past max_steps 2" in msg and "--max-steps" in msg and "\n" not in msg
    assert _snapshot(out) == before
    with pytest.raises(ValueError, match="already at step 4, past max_steps 2"):
        _trainer(data, out, max_steps=2, save_every=2, keep_last=3).train(resume=True)
    capsys.readouterr()
    assert _train(data, out, "--resume", "--lr", "1e-3") == 0  # at --max-steps 4 already: nothing to do
    got = capsys.readouterr()
    assert "nan" not in got.out + got.err and "already at step 4 = --max-steps 4" in got.err
    assert "nothing to train" in got.err and _snapshot(out) == before  # no history entry for a no-op

def test_a_live_lock_refuses_a_second_writer(data, run, tmp_path):
    from sam_fast.train.outputs import RunLock, RunLockedError

    out = _copy(run, tmp_path)
    with RunLock(out):
        info = json.loads((out / ".lock").read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        with pytest.raises(SystemExit, match=rf"in use by pid {os.getpid()} on {socket.gethostname()}"):
            _train(data, out, "--resume", "--max-steps", "6")
        with pytest.raises(RunLockedError):
            RunLock(out).acquire()
    assert not (out / ".lock").exists()
    (out / ".lock").write_text(json.dumps({"pid": 1, "host": "elsewhere.example", "started": "x"}))
    with pytest.raises(SystemExit, match="on elsewhere.example"):  # another host: cannot tell; refuse
        _train(data, out, "--resume", "--max-steps", "6")


def test_a_stale_lock_is_taken_over(data, run, tmp_path, capsys):
    out = _copy(run, tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "x"}))
    capsys.readouterr()
    assert _train(data, out, "--resume") == 0  # nothing left to train; the lock was taken and released
    assert f"stale lock of pid {dead.pid}" in capsys.readouterr().err
    assert not (out / ".lock").exists()


# -- 10. SIGINT/SIGTERM -----------------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_checkpoint_and_exits_with_one_line(data, run, tmp_path, capsys, monkeypatch, sig):
    out = tmp_path / "sig"
    real = Trainer._load

    def load(self, idx, epoch):
        if self.step == 2:  # during step 3 (the last checkpoint was step 2)
            os.kill(os.getpid(), sig)
        return real(self, idx, epoch)

    monkeypatch.setattr(Trainer, "_load", load)
    capsys.readouterr()
    rc = _train(data, out, "--save-every", "100")
    err = capsys.readouterr().err
    assert rc == 128 + sig
    lines = [x for x in err.splitlines() if x.strip() and "Writing model shards" not in x]  # base/'s save bar
    assert len(lines) == 1 and "Traceback" not in err and "step-00000003" in lines[0]
    assert latest_checkpoint(out / "checkpoints").name == "step-00000003"
    assert not (out / ".lock").exists()
    monkeypatch.setattr(Trainer, "_load", real)
    assert _train(data, out, "--resume", "--save-every", "100") == 0
    assert [r["loss"] for r in _log(out)] == [r["loss"] for r in _log(run)]  # nothing lost, bit-exact


# -- 7. nonsense numeric options ---------------------------------------------------------------------
@pytest.mark.parametrize("flag,value,field", [
    ("--clip-grad-norm", "-1", "clip_grad_norm"), ("--clip-grad-norm", "nan", "clip_grad_norm"),
    ("--lr", "0", "lr"), ("--lr", "-3e-3", "lr"), ("--lr", "inf", "lr"), ("--weight-decay", "-0.1", "weight_decay"),
    ("--batch-size", "0", "batch_size"), ("--max-steps", "-5", "max_steps"), ("--save-every", "0", "save_every"),
    ("--keep-last", "0", "keep_last"), ("--log-every", "0", "log_every"), ("--grad-accum", "-1", "grad_accum"),
    ("--warmup-steps", "-1", "warmup_steps"), ("--seed", "-1", "seed"),
])
def test_nonsense_numeric_flags_are_refused(data, tmp_path, flag, value, field):
    out = tmp_path / "o"
    args = ["train", "--config", "tiny", "--data", str(data), "--output", str(out), *TRAIN, f"{flag}={value}"]
    with pytest.raises(SystemExit) as e:
        main(args)
    msg = str(e.value)
    assert msg.startswith("sam-fast train:") and field in msg and "\n" not in msg
    assert not out.exists()  # refused before anything is written


def test_config_file_types_are_checked(data, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: tiny\ndata: {data}\noutput: {tmp_path / 'o'}\nlr: 1e-3\n")  # YAML 1.1: a string
    with pytest.raises(SystemExit, match="lr='1e-3' must be a number"):
        main(["train", "--config", str(cfg), "--no-progress"])
    with pytest.raises(ValueError, match="betas"):
        TrainConfig(betas=(0.9, 1.5)).validate()
    with pytest.raises(ValueError, match="min_lr_ratio"):
        TrainConfig(min_lr_ratio=2.0).validate()


def test_a_second_signal_aborts_at_once_with_one_line(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "twice"
    real = Trainer._load

    def load(self, idx, epoch):
        if self.step == 2:  # two Ctrl-C during step 3: no checkpoint of step 3
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, idx, epoch)

    monkeypatch.setattr(Trainer, "_load", load)
    capsys.readouterr()
    assert _train(data, out, "--save-every", "2") == 130
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip() and "Writing model shards" not in x]
    assert len(lines) == 1 and "step-00000002" in lines[0] and "Traceback" not in lines[0]
    assert latest_checkpoint(out / "checkpoints").name == "step-00000002" and not (out / ".lock").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_trainer_refuses_to_restart_over_a_run_and_resume_without_checkpoint_restarts_the_log(data, tmp_path):
    from sam_fast.train import RunDirectoryError

    tr = _trainer(data, tmp_path / "r", max_steps=2, save_every=100)
    train_killed_at(tr, 1, KeyboardInterrupt)  # killed in step 2, before any checkpoint: the log holds step 1
    assert [r["step"] for r in _log(tmp_path / "r")] == [1]
    with pytest.raises(RunDirectoryError, match="already holds a training run"):
        _trainer(data, tmp_path / "r", max_steps=2, save_every=100).train()
    _trainer(data, tmp_path / "r", max_steps=2, save_every=100).train(resume=True)
    assert [r["step"] for r in _log(tmp_path / "r")] == [1, 2]  # not 1, 1, 2


# -- damaged contents behind valid checksums: named, and the previous checkpoint is used ----------------
def _resign(ck):
    """Recompute trainer_state.json's checksums after its files were changed: what someone who
    edits a checkpoint on purpose (or a buggy tool) produces; the checksums then say nothing."""
    manifest = json.loads((ck / "trainer_state.json").read_text())
    body = {k: v for k, v in manifest.items() if k != "sha256"}
    for name in body["files"]:
        body["files"][name] = {"sha256": ckpt._sha256(ck / name), "bytes": (ck / name).stat().st_size}
    (ck / "trainer_state.json").write_text(json.dumps({**body, "sha256": hashlib.sha256(
        ckpt._canonical(body)).hexdigest()}))


def _edit_trainable(ck, edit):
    from safetensors.torch import load_file, save_file

    tensors = edit(load_file(str(ck / "trainable.safetensors")))
    save_file(tensors, str(ck / "trainable.safetensors"), metadata={"step": "4", "format": "sam_fast.trainable"})
    _resign(ck)


def _edit_state(ck, edit):
    manifest = json.loads((ck / "trainer_state.json").read_text())
    edit(manifest["state"])
    (ck / "trainer_state.json").write_text(json.dumps(manifest))
    _resign(ck)


def _first_key(t):
    return sorted(t)[0]


def _edit_state_tensor(ck, find, edit):
    """Change one tensor of the resume state (`find(state)` -> its {"__tensor__": key} reference)."""
    from safetensors.torch import load_file, save_file

    manifest = json.loads((ck / "trainer_state.json").read_text())
    key = find(manifest["state"])["__tensor__"]
    tensors = load_file(str(ck / "trainer_state.safetensors"))
    tensors[key] = edit(tensors[key])
    save_file(tensors, str(ck / "trainer_state.safetensors"), metadata={"step": "4", "format": manifest["format"]})
    _resign(ck)


def _first_moment(state, name="exp_avg"):
    return state["optimizer"]["state"]["__items__"][0][1][name]  # the encoded {param index: moments}


DAMAGE = {
    "nested_json": lambda ck: (ck / "trainer_state.json").write_text("[" * 100_000 + "]" * 100_000),
    "extra_key": lambda ck: _edit_trainable(ck, lambda t: {**t, "evil.weight": torch.zeros(3)}),
    "missing_key": lambda ck: _edit_trainable(ck, lambda t: {k: v for k, v in t.items() if k != _first_key(t)}),
    "other_shape": lambda ck: _edit_trainable(ck, lambda t: {k: torch.zeros(7, 7) if k == _first_key(t) else v
                                                               for k, v in t.items()}),
    "integer_dtype": lambda ck: _edit_trainable(ck, lambda t: {k: v.to(torch.int32) if k == _first_key(t) else v
                                                                 for k, v in t.items()}),
    "step_out_of_range": lambda ck: _edit_state(ck, lambda s: s.__setitem__("step", -5)),
    "step_huge": lambda ck: _edit_state(ck, lambda s: s.__setitem__("step", 10**30)),
    "data_position": lambda ck: _edit_state(ck, lambda s: s.__setitem__("data", {"epoch": "x", "pos": -1})),
    "world_size": lambda ck: _edit_state(ck, lambda s: s.__setitem__("world_size", 0)),
    "nan_trainable": lambda ck: _edit_trainable(ck, lambda t: {k: v.fill_(float("nan")) if k == _first_key(t) else v
                                                                 for k, v in t.items()}),
    "optimizer_shape": lambda ck: _edit_state_tensor(ck, _first_moment, lambda t: t.reshape(-1)[:1].clone()),
    "optimizer_step": lambda ck: _edit_state_tensor(ck, lambda s: _first_moment(s, "step"),
                                                    lambda t: torch.full_like(t, -3)),
    "rng_dtype": lambda ck: _edit_state_tensor(ck, lambda s: s["rng"]["torch"], lambda t: t.float()),
}
RESUME_STATE_ONLY = {"data_position", "world_size", "optimizer_shape", "optimizer_step", "rng_dtype"}
SAYS = {"nested_json": "trainer_state.json: nested too deeply", "extra_key": "unexpected ['evil.weight']",
        "missing_key": "missing [", "other_shape": "has shape (7, 7)", "integer_dtype": "is int32, not floating",
        "step_out_of_range": "differs from the checkpoint's step 4",
        "step_huge": "differs from the checkpoint's step 4", "data_position": "data position",
        "world_size": "world_size '0'", "nan_trainable": "holds NaN or infinite values",
        "optimizer_shape": "has shape (1,)", "optimizer_step": "is not a count >= 0",
        "rng_dtype": "torch generator state is not a uint8 tensor"}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_contents_are_named_and_the_previous_checkpoint_is_used(data, run, tmp_path, capsys, damage):
    from sam_fast.models.directory import load_model_dir

    out = _copy(run, tmp_path)
    DAMAGE[damage](out / "checkpoints" / "step-00000004")
    _, _, what = load_model_dir(out)  # eval / generate: the previous intact checkpoint, the damage named
    err = capsys.readouterr().err
    if damage in RESUME_STATE_ONLY:  # eval reads only the (intact) trainable tensors of step 4
        assert what.endswith("at step 4 (step-00000004)") and "damaged" not in err
        load_checkpoint(out / "checkpoints" / "step-00000004")  # and its checksums are fine ...
    else:
        assert what.endswith("at step 2 (step-00000002)")
        assert "checkpoint step-00000004 is damaged: " in err and SAYS[damage] in err and "falling back" in err
    cfg = TrainConfig(output_dir=str(out), max_steps=4, batch_size=2, lr=3e-3, warmup_steps=1, save_every=2,
                      progress=False)
    torch.manual_seed(0)
    from sam_fast.models.directory import build_builtin, builtin_tokenizers
    from sam_fast.data import AnnotationDataset, PromptBuilder, TrainTransform

    model = build_builtin("tiny")
    trainer = Trainer(model, AnnotationDataset(data, TrainTransform(model.config.vision_config.image_size)),
                      PromptBuilder.for_model(model.config, *builtin_tokenizers("tiny")), cfg)
    assert trainer.resume() and trainer.step == 2  # ... but a resume restores nothing from it
    err = capsys.readouterr().err
    assert "checkpoint step-00000004 is damaged: " in err and SAYS[damage] in err


@pytest.mark.parametrize("content", ["[" * 100_000 + "]" * 100_000, '{"base": {"kind": "builtin"', "[1, 2]"])
def test_a_damaged_run_json_is_one_line_and_left_as_it_is(data, run, tmp_path, content):
    out = _copy(run, tmp_path)
    (out / "run.json").write_text(content)
    with pytest.raises(SystemExit, match=r"^sam-fast train: --resume: .*run\.json: damaged or not written by "
                                         r"sam_fast .*move it aside") as exc:
        _train(data, out, "--resume", "--max-steps", "6")
    assert "\n" not in str(exc.value.code) and (out / "run.json").read_text() == content


def _tree(root):
    """{relative path: bytes} of every file under `root`, links followed (what a user would lose)."""
    import os

    out = {}
    for dirpath, _, files in os.walk(root, followlinks=True):
        for name in files:
            p = os.path.join(dirpath, name)
            out[os.path.relpath(p, root)] = open(p, "rb").read()
    return out


def test_overwrite_refuses_a_run_json_that_only_looks_like_a_run(data, tmp_path):
    """Someone's run.json shaped like an older sam_fast run (base with a kind, train options) and a log
    beside it prove nothing: --overwrite refuses before removing or writing anything."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"base": {"kind": "dir", "path": "/x"}, "train": {"lr": 0.1}}))
    (out / "log.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    (out / "notes.txt").write_text("mine")
    before = _tree(out)
    with pytest.raises(SystemExit, match=r"holds file\(s\) where the new run writes that are not the run's own "
                                         r"\(log\.jsonl, run\.json.*nothing was removed or written"):
        _train(data, out, "--overwrite")
    assert _tree(out) == before


def test_overwrite_refuses_a_run_whose_checkpoints_folder_is_a_link(data, run, tmp_path):
    out = _copy(run, tmp_path)
    elsewhere = tmp_path / "scratch"
    shutil.move(str(out / "checkpoints"), elsewhere)
    (out / "checkpoints").symlink_to(elsewhere, target_is_directory=True)
    before = _tree(tmp_path)
    with pytest.raises(SystemExit, match=r"not the run's own \(checkpoints.*nothing was removed or written"):
        _train(data, out, "--overwrite", "--seed", "3")
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("override, says", [({"num_query_tokens": 1e8}, "num_query_tokens"),
                                            ({"num_query_tokens": 10**8}, "num_query_tokens")])
def test_unbounded_model_overrides_are_one_line(data, tmp_path, override, says):
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"model": "tiny", "max_steps": 1, "model_overrides": override}))
    with pytest.raises(SystemExit, match=rf"^sam-fast train: model_overrides: .*{says}") as exc:
        main(["train", "--config", str(cfg), "--data", str(data), "--output", str(tmp_path / "o"), "--no-progress"])
    assert "\n" not in str(exc.value.code)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())  # nothing written
