"""Trainer: schedule points, weight-decay split, kill-and-resume equality, atomic checkpoints,
non-finite loss, gradient accumulation, AMP."""

import json
import math

import pytest
import torch
from _killing import train_killed_at

from sam_fast import SAM, SAMConfig
from sam_fast.data import AnnotationDataset, PromptBuilder, TrainTransform, tiny_tokenizers
from sam_fast.data.synthetic import write_group_captions
from sam_fast.train import NonFiniteLossError, TrainConfig, Trainer, latest_checkpoint, load_checkpoint
from sam_fast.train import checkpoint as ckpt
from sam_fast.train.schedule import build_optimizer, build_scheduler, lr_factor, param_groups


def test_schedule_points():
    S, W = 1000, 240
    assert lr_factor(0, W, S) == pytest.approx(1 / 240)
    assert lr_factor(120, W, S) == pytest.approx(121 / 240)
    assert lr_factor(239, W, S) == pytest.approx(1.0)
    assert lr_factor(240, W, S) == pytest.approx(1.0)
    assert lr_factor(240 + 380, W, S) == pytest.approx(0.5)
    assert lr_factor(S, W, S) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(S, W, S, min_ratio=0.1) == pytest.approx(0.1)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3))
    opt = build_optimizer(model, 2e-5)
    sched = build_scheduler(opt, W, S)
    seen = {}
    for s in range(S + 1):
        seen[s] = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx(2e-5 / 240) and seen[120] == pytest.approx(2e-5 * 121 / 240)
    assert seen[240] == pytest.approx(2e-5) and seen[S] == pytest.approx(0.0, abs=1e-15)


def test_weight_decay_only_on_matrices():
    model = SAM(SAMConfig.tiny())
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert sorted(decay["names"]) == ["adaptive_adjustment.weight", "guidance_in.weight", "guidance_out.weight",
                                      "language_projection.weight"]
    assert all(n.endswith(".bias") for n in no_decay["names"]) and len(no_decay["names"]) == 4


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_group_captions(tmp_path_factory.mktemp("ds") / "train", n_samples=12, size=32, seed=3)


def _setup(data_dir, out, **kw):
    cfg = SAMConfig.tiny()
    torch.manual_seed(0)
    model = SAM(cfg)
    q, llm = tiny_tokenizers()
    pb = PromptBuilder.for_model(cfg, q, llm)
    ds = AnnotationDataset(data_dir, TrainTransform(cfg.vision_config.image_size), seed=0)
    opts = dict(output_dir=str(out), max_steps=6, batch_size=4, lr=3e-3, warmup_steps=2, save_every=2,
                keep_last=2, progress=False)
    opts.update(kw)
    return Trainer(model, ds, pb, TrainConfig(**opts))


def _log(out):
    return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]



def test_kill_and_resume_is_bit_exact(data_dir, tmp_path):
    full = _setup(data_dir, tmp_path / "full")
    res = full.train()
    assert res.step == 6 and len(res.losses) == 6
    ref = _log(tmp_path / "full")
    assert [r["step"] for r in ref] == [1, 2, 3, 4, 5, 6] and ref[-1]["epoch"] == 1  # 3 steps per epoch (0-based)
    assert [p.name for p in sorted((tmp_path / "full" / "checkpoints").glob("step-*"))] == ["step-00000004",
                                                                                           "step-00000006"]

    part = _setup(data_dir, tmp_path / "part")
    train_killed_at(part, 5)  # killed while loading step 6's data (after checkpoint 4, log up to 5)
    assert [r["step"] for r in _log(tmp_path / "part")] == [1, 2, 3, 4, 5]
    resumed = _setup(data_dir, tmp_path / "part")
    resumed.train(resume=True)
    got = _log(tmp_path / "part")
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]  # step 5 re-run, its old record dropped
    assert [r["loss"] for r in got] == [r["loss"] for r in ref]  # bit-exact
    assert [r["lr"] for r in got] == [r["lr"] for r in ref]
    a, _ = load_checkpoint(latest_checkpoint(tmp_path / "full" / "checkpoints"))
    b, _ = load_checkpoint(latest_checkpoint(tmp_path / "part" / "checkpoints"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert ref[-1]["loss"] < ref[0]["loss"]


def test_interrupted_checkpoint_write_keeps_the_previous(tmp_path, monkeypatch):
    t = {"w": torch.ones(3)}
    first = ckpt.save_checkpoint(tmp_path, 1, t, {"step": 1})
    real_save = ckpt.save_file

    def crash(tensors, filename, *a, **k):  # the second file of the checkpoint (the resume state's tensors)
        real_save(tensors, filename, *a, **k)
        if filename.endswith(ckpt.STATE_TENSORS_FILE):
            raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, 2, {"w": torch.zeros(3)}, {"step": 2})
    monkeypatch.setattr(ckpt, "save_file", real_save)
    assert latest_checkpoint(tmp_path) == first
    tensors, state = load_checkpoint(first)
    assert torch.equal(tensors["w"], torch.ones(3)) and state == {"step": 1}
    # the half-written folder is removed at once (a full disk would keep it full); clean_stale has nothing left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000001"]
    ckpt.clean_stale(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000001"]


def test_non_finite_loss_stops_with_last_good_checkpoint(data_dir, tmp_path):
    tr = _setup(data_dir, tmp_path / "nan", save_every=100)
    real_forward, calls = tr.model.forward, {"n": 0}

    def forward(**kw):
        calls["n"] += 1
        out = real_forward(**kw)
        if calls["n"] == 3:
            out.loss = out.loss * float("nan")
        return out

    tr.model.forward = forward
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at step 3 .*after step 2"):
        tr.train()
    path = latest_checkpoint(tmp_path / "nan" / "checkpoints")
    assert path.name == "step-00000002"
    tensors, state = load_checkpoint(path)
    assert state["step"] == 2 and state["data"] == {"epoch": 0, "pos": 8}
    assert all(torch.isfinite(v).all() for v in tensors.values())
    # Resuming from it re-runs step 3 on the same samples
    again = _setup(data_dir, tmp_path / "nan", save_every=100, max_steps=6)
    again.train(resume=True)
    assert [r["step"] for r in _log(tmp_path / "nan")] == [1, 2, 3, 4, 5, 6]


def test_grad_accumulation_matches_one_big_batch(data_dir, tmp_path):
    big = _setup(data_dir, tmp_path / "big", max_steps=3, save_every=100).train()
    acc = _setup(data_dir, tmp_path / "acc", max_steps=3, save_every=100, batch_size=2, grad_accum=2).train()
    torch.testing.assert_close(torch.tensor(acc.losses), torch.tensor(big.losses), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_runs(data_dir, tmp_path, amp):
    tr = _setup(data_dir, tmp_path / amp, max_steps=2, save_every=100, amp=amp)
    res = tr.train()
    assert all(math.isfinite(x) for x in res.losses)
    assert all(p.dtype == torch.float32 for p in tr.params)
    _, state = load_checkpoint(res.checkpoint)
    if amp == "fp16":  # the grad scaler's state is checkpointed for resume
        assert state["scaler"]["scale"] > 0


def test_refuses_bad_config(data_dir, tmp_path):
    with pytest.raises(ValueError, match="amp='fp8'"):
        _setup(data_dir, tmp_path, amp="fp8")
    with pytest.raises(ValueError, match="larger than the dataset"):
        _setup(data_dir, tmp_path, batch_size=13)
    with pytest.raises(ValueError, match="unknown training option"):
        TrainConfig.from_dict({"lr": 1.0, "learning_rate": 2.0})


def test_resume_with_more_steps_follows_the_new_schedule(data_dir, tmp_path):
    """A finished run (cosine at its end) extended with a larger max_steps: the first resumed step
    uses the new schedule's rate, not the 0 the old one left in the optimiser; a warning names
    the change."""
    first = _setup(data_dir, tmp_path / "run", max_steps=4, save_every=4)
    first.train()
    more = _setup(data_dir, tmp_path / "run", max_steps=8, save_every=4)
    with pytest.warns(UserWarning, match="max_steps: 4 -> 8"):
        more.train(resume=True)
    recs = _log(tmp_path / "run")
    assert [r["step"] for r in recs] == list(range(1, 9))
    want = [3e-3 * lr_factor(s, 2, 8) for s in range(4, 8)]
    assert [r["lr"] for r in recs[4:]] == pytest.approx(want, rel=1e-12)
    assert recs[4]["lr"] > 0


def test_skipped_samples_are_counted_once_across_epochs(tmp_path):
    """One sample skipped when the dataset opens and one that fails only at decode time (drawn on every step):
    the trainer reports 2 skipped samples, not one per draw."""
    data = write_group_captions(tmp_path / "ds", n_samples=12, size=32, seed=3)
    (data / "images" / "0005_0.png").unlink()  # skipped at open
    (data / "images" / "0003_0.png").write_bytes(b"\x89PNG\r\n\x1a\nnot a png")  # passes the open (no verify)
    cfg = SAMConfig.tiny()
    torch.manual_seed(0)
    model = SAM(cfg)
    pb = PromptBuilder.for_model(cfg, *tiny_tokenizers())
    ds = AnnotationDataset(data, TrainTransform(cfg.vision_config.image_size), skip_bad=True, verify_images=False)
    assert len(ds) == 11 and len(ds.skipped) == 1
    trainer = Trainer(model, ds, pb, TrainConfig(output_dir=str(tmp_path / "run"), max_steps=3, batch_size=11,
                                                 lr=1e-3, save_every=3, progress=False))
    res = trainer.train()  # one step = one epoch of all 11 samples: the undecodable one is drawn 3 times
    assert res.step == 3 and trainer.collator.dropped == 3
    assert res.skipped == 2
    _, state = load_checkpoint(res.checkpoint)
    assert state["skipped"] == 2


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_frozen_weights_fp32_trainable_and_checkpoints(data_dir, tmp_path, dtype):
    """dtype: the frozen parameters in half precision, the trainable modules, their optimiser moments and
    the checkpointed tensors float32; the steps' losses finite (both dtypes run on a CPU). fp16's grad
    scaler skips the first 3 steps (inf gradients at its initial scale), so 4 steps update once at least."""
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    tr = _setup(data_dir, tmp_path / dtype, max_steps=4, save_every=100, dtype=dtype)
    res = tr.train()
    assert all(math.isfinite(x) for x in res.losses) and len(res.losses) == 4
    assert tr.scaler.is_enabled() == (dtype == "fp16")
    trainable = {n for n, _ in tr.named_params}
    assert trainable and all(n.split(".")[0] in SAM.TRAINABLE_MODULES for n in trainable)
    kept = ("query_tokens",) if dtype == "fp16" else ()  # as transformers keeps it when loading in fp16
    for name, p in tr.model.named_parameters():
        want = torch.float32 if name in trainable or name in kept else half
        assert p.dtype == want, name
    moments = [v for st in tr.optimizer.state.values() for k, v in st.items() if k in ("exp_avg", "exp_avg_sq")]
    assert len(moments) == 2 * len(trainable) and all(m.dtype == torch.float32 for m in moments)
    tensors, state = load_checkpoint(res.checkpoint)
    assert sorted(tensors) == sorted(trainable) and all(t.dtype == torch.float32 for t in tensors.values())
    assert state["config"]["dtype"] == dtype
    assert tr.model.language_model.model.rotary_emb.inv_freq.dtype == torch.float32  # buffers left alone


def test_resume_with_another_dtype_is_refused_naming_both(data_dir, tmp_path):
    _setup(data_dir, tmp_path / "run", max_steps=2, save_every=2, dtype="bf16").train()
    with pytest.raises(ValueError, match=r"dtype: bf16 -> fp32"):
        _setup(data_dir, tmp_path / "run", max_steps=4, save_every=2, dtype="fp32").train(resume=True)
    res = _setup(data_dir, tmp_path / "run", max_steps=3, save_every=2, dtype="bf16").train(resume=True)
    assert res.step == 3 and [r["step"] for r in _log(tmp_path / "run")] == [1, 2, 3]


def test_dtype_and_a_different_amp_are_refused(data_dir, tmp_path):
    with pytest.raises(ValueError, match="amp='fp16' with dtype='bf16'"):
        _setup(data_dir, tmp_path, dtype="bf16", amp="fp16")
    with pytest.raises(ValueError, match="dtype='fp64' is not one of"):
        _setup(data_dir, tmp_path, dtype="fp64")
    assert TrainConfig(dtype="bf16", amp="bf16").compute_dtype == torch.bfloat16
    assert TrainConfig(dtype="fp32", amp="fp16").compute_dtype == torch.float16
    assert TrainConfig(dtype="fp32").compute_dtype is None


# -- evaluations during training (eval_every) --------------------------------------------------------------------
@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory):
    return write_group_captions(tmp_path_factory.mktemp("ds") / "heldout", n_samples=3, size=32, seed=5)


def _eval_setup(data_dir, eval_dir, out, **kw):
    return _setup(data_dir, out, eval_data=str(eval_dir), eval_max_new_tokens=3, **kw)


def _history(out):
    return json.loads((out / "eval_history.json").read_text())


def test_evaluations_every_n_steps_and_at_the_end_leave_the_training_unchanged(data_dir, eval_dir, tmp_path):
    """eval_every=2 over 5 steps: evaluations at 2, 4 and 5, each after its step's checkpoint, in the
    history and log.jsonl; the losses equal a run without evaluations (RNGs and modes restored)."""
    plain = _setup(data_dir, tmp_path / "plain", max_steps=5, save_every=100).train()
    tr = _eval_setup(data_dir, eval_dir, tmp_path / "ev", max_steps=5, save_every=100, eval_every=2, eval_limit=2,
                     keep_last=5)
    res = tr.train()
    assert res.losses == plain.losses
    hist = _history(tmp_path / "ev")
    assert [e["step"] for e in hist] == [2, 4, 5] and [e["step"] for e in res.evals] == [2, 4, 5]
    for e in hist:
        assert set(e) == {"step", "metrics", "samples", "seconds"}
        assert set(e["metrics"]) == {"ROUGE_L", "CIDEr", "Bleu_4", "num_samples", "skipped"}
        assert e["metrics"]["num_samples"] == 2 and [s["sample_id"] for s in e["samples"]] == [0, 1]
        assert all(set(s) == {"sample_id", "pred_response", "gt_response"} for s in e["samples"])
    evals = [r for r in _log(tmp_path / "ev") if "eval" in r]
    assert [(r["step"], r["eval"]) for r in evals] == [(e["step"], e["metrics"]) for e in hist]
    assert [r["step"] for r in _log(tmp_path / "ev") if "loss" in r] == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in (tmp_path / "ev" / "checkpoints").glob("step-*")) == [
        "step-00000002", "step-00000004", "step-00000005"]  # every score has its checkpoint
    assert tr.model.guidance_in.training and not tr.model.qformer.training and not tr.model.language_model.training
    _, a = load_checkpoint(plain.checkpoint)
    _, b = load_checkpoint(res.checkpoint)
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"]) and a["rng"]["python"] == b["rng"]["python"]


def test_a_resumed_run_appends_to_the_history_and_redoes_only_what_was_cut_short(data_dir, eval_dir, tmp_path,
                                                                                   monkeypatch, capsys):
    """Killed during the evaluation of step 4 (after its checkpoint): the resumed run evaluates step 4 first,
    keeps step 2's entry as it was, and goes on; a second resume to 8 appends step 6 and 8 without repeating
    4 or 6. An entry past the checkpoint a run resumes from (that checkpoint lost) is dropped, said in one
    line, and made again, equal to before."""
    from sam_fast.train.validation import Validation

    out, real_run = tmp_path / "run", Validation.run

    def killed_at_4(self, model, step, *a):
        if step == 4:
            raise KeyboardInterrupt  # a second SIGINT: no checkpoint of the step in progress
        return real_run(self, model, step, *a)

    monkeypatch.setattr(Validation, "run", killed_at_4)
    with pytest.raises(KeyboardInterrupt):
        _eval_setup(data_dir, eval_dir, out, max_steps=6, save_every=100, eval_every=2).train()
    first = _history(out)
    assert [e["step"] for e in first] == [2] and latest_checkpoint(out / "checkpoints").name == "step-00000004"
    monkeypatch.setattr(Validation, "run", real_run)
    _eval_setup(data_dir, eval_dir, out, max_steps=6, save_every=100, eval_every=2).train(resume=True)
    hist = _history(out)
    assert [e["step"] for e in hist] == [2, 4, 6] and hist[0] == first[0]
    assert [r["step"] for r in _log(out) if "eval" in r] == [2, 4, 6]
    res = _eval_setup(data_dir, eval_dir, out, max_steps=8, save_every=100, eval_every=2).train(resume=True)
    assert [e["step"] for e in res.evals] == [8] and _history(out)[:3] == hist
    assert [e["step"] for e in _history(out)] == [2, 4, 6, 8]
    # checkpoint 8 lost: the run resumes from 6, its evaluation of step 8 goes and is made again (same answers)
    import shutil

    shutil.rmtree(out / "checkpoints" / "step-00000008")
    (out / "checkpoints" / "latest").unlink()
    before = _history(out)
    capsys.readouterr()
    _eval_setup(data_dir, eval_dir, out, max_steps=8, save_every=100, eval_every=2).train(resume=True)
    assert "dropped 1 evaluation(s) after step 6" in capsys.readouterr().err
    after = _history(out)
    assert [e["step"] for e in after] == [2, 4, 6, 8] and after[3]["samples"] == before[3]["samples"]
    assert [r["step"] for r in _log(out) if "eval" in r] == [2, 4, 6, 8]


def test_evaluation_settings_are_checked(data_dir, eval_dir, tmp_path):
    with pytest.raises(ValueError, match="eval_every=2 needs eval_data"):
        _setup(data_dir, tmp_path, eval_every=2)
    with pytest.raises(ValueError, match="needs eval_every >= 1"):
        _setup(data_dir, tmp_path, eval_data=str(eval_dir))
    with pytest.raises(ValueError, match="eval_limit=0 must be >= 1"):
        _eval_setup(data_dir, eval_dir, tmp_path, eval_every=1, eval_limit=0)
    with pytest.raises(ValueError, match="eval_every with fsdp"):
        TrainConfig(eval_every=1, eval_data=str(eval_dir), fsdp=True).validate()


def test_a_new_run_never_replaces_an_evaluation_history(data_dir, eval_dir, tmp_path):
    from sam_fast.train import RunDirectoryError

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "eval_history.json").write_text("[]")
    with pytest.raises(RunDirectoryError, match="eval_history.json"):
        _eval_setup(data_dir, eval_dir, tmp_path / "run", max_steps=2, eval_every=1).train()
    assert (tmp_path / "run" / "eval_history.json").read_text() == "[]"
