"""`sam-fast` end to end on a tiny PIL-drawn dataset: train, resume, config file + overrides, eval,
generate, bad data, and torchrun data parallelism (2 gloo processes == 1 process, same global batch)."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

from sam_fast.cli import build_parser, main
from sam_fast.data.synthetic import write_group_captions


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run faster on one intra-op thread (and much faster on a busy 2-core machine)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return {"train": write_group_captions(root / "train", n_samples=8, size=40, seed=1),
            "test": write_group_captions(root / "test", n_samples=3, size=40, seed=2), "root": root}


def _log(out):
    return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]


TRAIN = ["--batch-size", "2", "--max-steps", "4", "--save-every", "2", "--lr", "3e-3", "--warmup-steps", "1",
         "--no-progress"]


@pytest.fixture(scope="module")
def trained(dirs):
    out = dirs["root"] / "run"
    assert main(["train", "--config", "tiny", "--data", str(dirs["train"]), "--output", str(out), *TRAIN]) == 0
    return out


def test_train_writes_a_run_directory(trained):
    assert sorted(p.name for p in trained.iterdir()) == ["base", "checkpoints", "log.jsonl", "run.json", "tokenizer"]
    log = _log(trained)
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert {"step", "loss", "lr", "grad_norm", "samples_per_s"} <= set(log[0])
    run = json.loads((trained / "run.json").read_text())
    assert run["base"]["kind"] == "builtin" and run["train"]["batch_size"] == 2 and run["train"]["lr"] == 3e-3


def test_resume_after_a_lost_checkpoint(dirs, trained):
    out = dirs["root"] / "resumed"
    shutil.copytree(trained, out)
    shutil.rmtree(out / "checkpoints" / "step-00000004")  # as if killed before step 4's checkpoint landed
    assert main(["train", "--config", "tiny", "--data", str(dirs["train"]), "--output", str(out), "--resume",
                 *TRAIN]) == 0
    assert [r["loss"] for r in _log(out)] == [r["loss"] for r in _log(trained)]


def test_config_file_and_overrides(dirs, tmp_path):
    cfg = tmp_path / "run.yaml"
    out = tmp_path / "out"
    cfg.write_text(f"model: tiny\ndata: {dirs['train']}\noutput: {out}\nbatch_size: 2\nmax_steps: 3\nlr: 0.003\n"
                   "warmup_steps: 1\nmodel_overrides:\n  context_mode: shared\n")
    assert main(["train", "--config", str(cfg), "--max-steps", "1", "--no-progress"]) == 0
    assert [r["step"] for r in _log(out)] == [1]  # the command line wins over the file
    run = json.loads((out / "run.json").read_text())
    assert run["base"]["overrides"] == {"context_mode": "shared"} and run["train"]["max_steps"] == 1


def test_eval_and_generate(dirs, trained, tmp_path, capsys):
    ev = tmp_path / "eval"
    assert main(["eval", "--model", str(trained), "--data", str(dirs["test"]), "--output", str(ev),
                 "--num-beams", "2", "--max-new-tokens", "6", "--no-progress"]) == 0
    preds = json.loads((ev / "pred.json").read_text())
    assert [p["sample_id"] for p in preds] == [0, 1, 2]
    assert all(set(p) == {"sample_id", "pred_response", "gt_response"} for p in preds)
    metrics = json.loads((ev / "metrics.json").read_text())
    assert {"ROUGE_L", "CIDEr", "Bleu_4"} <= set(metrics) and metrics["num_samples"] == 3
    assert "ROUGE_L" in capsys.readouterr().out
    # a checkpoint directory is a valid --model too
    ck = trained / "checkpoints" / "step-00000002"
    imgs = sorted(str(p) for p in (dirs["test"] / "images").iterdir())[:2]
    assert main(["generate", "--model", str(ck), "--images", *imgs, "--prompt", "{image#1} {image#2} what is common?",
                 "--num-beams", "1", "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    assert printed.endswith("\n")
    from sam_fast.eval import answer
    from sam_fast.train.outputs import load_model_dir, prompt_builder

    model, toks, _ = load_model_dir(ck)
    text = answer(model, prompt_builder(model, toks), imgs, "{image#1} {image#2} what is common?", num_beams=1,
                  max_new_tokens=4)
    assert printed == text + "\n"  # the CLI prints the Python API's answer
    with pytest.raises(SystemExit, match="does not exist"):
        main(["generate", "--model", str(ck), "--images", "nope.png", "--prompt", "x"])


def test_cache_features_then_train_and_eval_from_it(dirs, tmp_path):
    cache = tmp_path / "cache"
    assert main(["cache-features", "--model", "tiny", "--data", str(dirs["train"]), "--output", str(cache),
                 "--dtype", "float32", "--no-progress"]) == 0
    out = tmp_path / "run"
    assert main(["train", "--config", "tiny", "--data", str(dirs["train"]), "--features", str(cache),
                 "--output", str(out), "--batch-size", "2", "--max-steps", "2", "--no-progress"]) == 0
    assert [r["step"] for r in _log(out)] == [1, 2]
    with pytest.raises(SystemExit, match="another vision model"):  # seed 1 -> other random ViT
        main(["train", "--config", "tiny", "--seed", "1", "--data", str(dirs["train"]), "--features", str(cache),
              "--output", str(tmp_path / "x"), "--batch-size", "2", "--max-steps", "1", "--no-progress"])
    with pytest.raises(SystemExit, match="changed since the cache was built"):  # another set's images, same names
        main(["eval", "--model", str(out), "--data", str(dirs["test"]), "--features", str(cache),
              "--output", str(tmp_path / "ev"), "--no-progress"])


def test_train_from_an_hf_instructblip_directory(dirs, tmp_path):
    """--model HF_DIR: weights and tokenizers (root + qformer_tokenizer/) from local files; the run
    directory references the base instead of copying it, and eval reloads base + checkpoint."""
    from _tiny import tiny_instructblip

    from sam_fast.data import tiny_tokenizers

    hf = tmp_path / "hf"
    tiny_instructblip().save_pretrained(hf)
    q, llm = tiny_tokenizers(qformer_vocab_size=100, llm_vocab_size=119)  # the HF tiny config's sizes
    q.save_pretrained(hf / "qformer_tokenizer")
    llm.save_pretrained(hf)
    out = tmp_path / "run"
    assert main(["train", "--model", str(hf), "--data", str(dirs["train"]), "--output", str(out), "--batch-size", "2",
                 "--max-steps", "2", "--lr", "1e-2", "--no-progress"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["base"]["kind"] == "pretrained" and not (out / "base").exists()
    assert main(["eval", "--model", str(out), "--data", str(dirs["test"]), "--output", str(tmp_path / "ev"),
                 "--num-beams", "1", "--max-new-tokens", "4", "--no-progress"]) == 0
    from sam_fast.train.outputs import load_model_dir

    model, _, what = load_model_dir(out)
    assert "step 2" in what and model.guidance_in.weight.abs().sum() > 0  # the trained delta is applied


def test_explain_writes_pngs(dirs, trained, tmp_path):
    assert main(["explain", "--model", str(trained), "--data", str(dirs["test"]), "--output", str(tmp_path / "ex"),
                 "--tile", "32"]) == 0
    assert sorted(p.name for p in (tmp_path / "ex").iterdir()) == ["sample_0.png", "sample_1.png", "sample_2.png"]
    imgs = sorted(str(p) for p in (dirs["test"] / "images").iterdir())[:3]
    assert main(["explain", "--model", str(trained), "--images", *imgs, "--output", str(tmp_path / "one.png")]) == 0
    assert (tmp_path / "one.png").is_file()


def test_bad_data_stops_or_is_skipped(tmp_path, capsys):
    data = write_group_captions(tmp_path / "bad", n_samples=5, size=32, seed=4)
    (data / "images" / "0002_0.png").unlink()
    args = ["train", "--config", "tiny", "--data", str(data), "--output", str(tmp_path / "o"), "--batch-size", "2",
            "--max-steps", "1", "--no-progress"]
    with pytest.raises(SystemExit, match=r"sample id 2: image file .*0002_0.png does not exist"):
        main(args)
    assert main(args + ["--skip-bad"]) == 0
    assert "skipped 1 bad sample(s)" in capsys.readouterr().out


def test_help_teaches():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"train", "generate", "eval", "cache-features", "explain", "bench", "env", "demo"} <= set(sub.choices)
    text = sub.choices["train"].format_help()
    for flag in ("--config", "--data", "--output", "--batch-size", "--max-steps", "--save-every", "--seed", "--resume"):
        assert flag in text


def test_bench_runs_the_benchmark_suite(monkeypatch, tmp_path):
    import subprocess

    calls = []
    monkeypatch.setattr(subprocess, "call", lambda cmd, cwd=None: calls.append(cmd) or 0)
    assert main(["bench", "-k", "context_reweight", "--json", str(tmp_path / "b.json")]) == 0
    run, report = calls
    # bench/run.py: one pytest per benchmark file, merged into the one JSON (as `make bench`)
    assert run[1].endswith("run.py") and run[2] == f"--json={tmp_path / 'b.json'}"
    assert run[-2:] == ["-k", "context_reweight"]
    assert report[1].endswith("report.py") and report[2] == str(tmp_path / "b.json")
    assert "--doc" not in report  # a partial run does not overwrite the Speed table


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(dirs, tmp_path):
    """DDP on CPU (gloo): 2 processes x 1 sample == 1 process x 2 samples, step for step."""
    common = ["train", "--config", "tiny", "--data", str(dirs["train"]), "--max-steps", "3", "--save-every", "3",
              "--lr", "3e-3", "--warmup-steps", "1", "--no-progress"]
    assert main(common + ["--output", str(tmp_path / "one"), "--batch-size", "2"]) == 0
    import socket

    with socket.socket() as sock:  # a free port: other jobs on the machine may use torchrun too
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "sam_fast.cli", *common, "--output", str(tmp_path / "two"), "--batch-size", "1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = _log(tmp_path / "one"), _log(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2, 3] and two[0]["samples"] == 2
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


@pytest.mark.slow
def test_torchrun_evaluations_equal_one_process(dirs, tmp_path):
    """--eval-every under torchrun (gloo, 2 processes): the samples split over the ranks, rank 0 writes the
    same history as one process (same answers, same scores)."""
    common = ["train", "--config", "tiny", "--data", str(dirs["train"]), "--max-steps", "3", "--save-every", "3",
              "--lr", "3e-3", "--warmup-steps", "1", "--no-progress", "--eval-every", "2", "--eval-data",
              str(dirs["test"]), "--eval-max-new-tokens", "4"]
    assert main(common + ["--output", str(tmp_path / "one"), "--batch-size", "2"]) == 0
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "sam_fast.cli", *common, "--output", str(tmp_path / "two"), "--batch-size", "1"]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (json.loads((tmp_path / d / "eval_history.json").read_text()) for d in ("one", "two"))
    assert [e["step"] for e in two] == [2, 3] and len(two[0]["samples"]) == 3
    assert [(e["metrics"], e["samples"]) for e in two] == [(e["metrics"], e["samples"]) for e in one]


# -- bad sizes, paths out of the dataset, file names from ids, cache replacement --------------------
@pytest.mark.parametrize("argv, flag, value", [
    (["eval", "--limit", "-1"], "--limit", "-1"), (["eval", "--batch-size", "0"], "--batch-size", "0"),
    (["eval", "--num-beams", "0"], "--num-beams", "0"), (["eval", "--num-beams", "-3"], "--num-beams", "-3"),
    (["generate", "--num-beams", "0"], "--num-beams", "0"),
    (["cache-features", "--batch-size", "0"], "--batch-size", "0"),
    (["explain", "--limit", "0"], "--limit", "0"), (["eval", "--max-new-tokens", "0"], "--max-new-tokens", "0")])
def test_non_positive_sizes_are_usage_errors(argv, flag, value, capsys):
    required = {"eval": ["--model", "m", "--data", "d", "--output", "o"], "generate": ["--model", "m", "--images", "a",
                "--prompt", "p"], "cache-features": ["--model", "m", "--data", "d", "--output", "o"],
                "explain": ["--model", "m", "--data", "d", "--output", "o"]}[argv[0]]
    with pytest.raises(SystemExit) as exc:
        main(argv + required)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument {flag}: must be a positive integer (>= 1), got {value}" in err


def _outside_dataset(root):
    """A dataset whose sample 1 reads ../outside.png (outside its folder)."""
    data = write_group_captions(root / "ds", n_samples=3, size=40, seed=5, max_images=1)
    shutil.copy(data / "images" / "0001_0.png", root / "outside.png")
    recs = json.loads((data / "annotations.json").read_text())
    recs[1]["img_list"] = ["../outside.png"]
    (data / "annotations.json").write_text(json.dumps(recs))
    return data


def test_paths_outside_the_dataset_need_allow_outside_paths(trained, tmp_path):
    data = _outside_dataset(tmp_path)
    runs = {"train": ["train", "--config", "tiny", "--data", str(data), "--output", str(tmp_path / "run"),
                      "--batch-size", "2", "--max-steps", "1", "--no-progress"],
            "eval": ["eval", "--model", str(trained), "--data", str(data), "--output", str(tmp_path / "ev"),
                     "--num-beams", "1", "--max-new-tokens", "2", "--no-progress"],
            "cache-features": ["cache-features", "--model", "tiny", "--data", str(data), "--output",
                               str(tmp_path / "cache"), "--no-progress"]}
    for cmd, argv in runs.items():
        with pytest.raises(SystemExit, match=rf"sam-fast {cmd}: .*sample id 1: image path '../outside.png' leaves "
                                             r"the dataset folder .*--allow-outside-paths") as exc:
            main(argv)
        assert "\n" not in str(exc.value)
        assert main(argv + ["--allow-outside-paths"]) == 0, cmd
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["num_samples"] == 3


def test_explain_file_names_from_ids_stay_in_the_output(trained, tmp_path):
    data = write_group_captions(tmp_path / "ds", n_samples=4, size=40, seed=6, max_images=1)
    recs = json.loads((data / "annotations.json").read_text())
    for rec, sid in zip(recs, ["a/../../../../x", "a_.._.._.._.._x", 7, "7"], strict=True):
        rec["id"] = sid
    (data / "annotations.json").write_text(json.dumps(recs))
    out = tmp_path / "deep" / "ex"
    assert main(["explain", "--model", str(trained), "--data", str(data), "--output", str(out), "--tile", "16"]) == 0
    written = sorted(p.name for p in out.iterdir())
    assert len(written) == 4 and all(n.startswith("sample_") and n.endswith(".png") for n in written)
    assert "sample_7.png" in written and "sample_7-2.png" in written  # 7 and "7": two files, not one
    assert sorted(p.name for p in tmp_path.rglob("*.png") if p.parent != out and "images" not in p.parts) == []


def test_cache_features_never_deletes_what_is_not_a_cache(dirs, tmp_path):
    before = sorted(p.name for p in dirs["train"].rglob("*"))
    with pytest.raises(SystemExit, match=r"^sam-fast cache-features: .* is not a sam_fast feature cache .*not "
                                         r"replacing it") as exc:
        main(["cache-features", "--model", "tiny", "--data", str(dirs["train"]), "--output", str(dirs["train"]),
              "--no-progress"])
    assert "\n" not in str(exc.value)
    assert sorted(p.name for p in dirs["train"].rglob("*")) == before
    cache = tmp_path / "cache"
    for _ in range(2):  # the second run replaces the first cache
        assert main(["cache-features", "--model", "tiny", "--data", str(dirs["test"]), "--output", str(cache),
                     "--dtype", "float32", "--no-progress"]) == 0
    assert (cache / "manifest.json").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_generate_refuses_placeholder_prompt_and_unreadable_image_in_one_line(dirs, trained, tmp_path):
    img = str(next((dirs["test"] / "images").iterdir()))
    with pytest.raises(SystemExit, match=r"^sam-fast generate: the prompt: 'instruction' contains the image "
                                         r"placeholder text '<image>'"):
        main(["generate", "--model", str(trained), "--images", img, "--prompt", "<image> what?"])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(SystemExit, match=r"^sam-fast generate: image .*bad.png cannot be read") as exc:
        main(["generate", "--model", str(trained), "--images", str(bad), "--prompt", "what?"])
    assert "\n" not in str(exc.value)


def _damaged_run(trained, tmp_path):
    """A copy of the trained run whose only checkpoint has a truncated trainable.safetensors."""
    run = tmp_path / "damaged"
    shutil.copytree(trained, run)
    shutil.rmtree(run / "checkpoints" / "step-00000002")
    f = run / "checkpoints" / "step-00000004" / "trainable.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return run


@pytest.mark.parametrize("cmd", ["eval", "generate", "explain", "cache-features"])
def test_damaged_or_missing_model_is_one_line(cmd, dirs, trained, tmp_path):
    run = _damaged_run(trained, tmp_path)
    imgs = sorted(str(p) for p in (dirs["test"] / "images").iterdir())[:2]
    rest = {"eval": ["--data", str(dirs["test"]), "--output", str(tmp_path / "ev"), "--no-progress"],
            "generate": ["--images", *imgs, "--prompt", "what?"],
            "explain": ["--images", *imgs, "--output", str(tmp_path / "x.png")],
            "cache-features": ["--data", str(dirs["test"]), "--output", str(tmp_path / "cache"), "--no-progress"]}[cmd]
    for model, what in [(run, r"trainable\.safetensors"), (run / "checkpoints" / "step-00000004",
                                                           r"step-00000004/trainable\.safetensors"),
                        (tmp_path / "no-such-run", "no-such-run")]:
        with pytest.raises(SystemExit, match=rf"^sam-fast {cmd}: .*{what}") as exc:
            main([cmd, "--model", str(model), *rest])
        assert "\n" not in str(exc.value)
    assert not (tmp_path / "ev").exists() and not (tmp_path / "x.png").exists()


def test_train_no_packing_gives_the_same_losses(tmp_path):
    """--no-packing runs the padded LLM call with full logits; the default packed, logit-free step
    must train identically (losses within fp32 rounding)."""
    data = write_group_captions(tmp_path / "ds", n_samples=6, size=32, seed=7)
    losses = {}
    for name, extra in (("packed", []), ("padded", ["--no-packing"])):
        out = tmp_path / name
        assert main(["train", "--config", "tiny", "--data", str(data), "--output", str(out), "--batch-size", "3",
                     "--max-steps", "3", "--lr", "3e-3", "--warmup-steps", "1", "--no-progress", *extra]) == 0
        losses[name] = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(losses["packed"]) == 3
    assert losses["packed"] == pytest.approx(losses["padded"], rel=1e-5)
    assert json.loads((tmp_path / "padded" / "run.json").read_text())["model"]["packed_loss"] is False


# -- data loading options, a required --model, one-line errors, help texts, metrics.json metadata --------
def test_train_bf16_frozen_fp32_trainable_resume_refuses_another_dtype(dirs, tmp_path, monkeypatch, capsys):
    """--dtype bf16 on a CPU: the frozen weights bf16, the trainable modules fp32 (and their checkpointed
    tensors), the losses finite, run.json records it; --resume with fp32 (the default) is refused in one line
    naming both, with bf16 it continues; eval and generate --dtype bf16 run on the run."""
    import math

    import torch
    from safetensors.torch import load_file

    from sam_fast.train import Trainer

    seen, real_train = {}, Trainer.train

    def spy(self, *a, **k):
        seen["model"] = self.model
        return real_train(self, *a, **k)

    monkeypatch.setattr(Trainer, "train", spy)
    out = tmp_path / "bf16"
    train = ["train", "--config", "tiny", "--data", str(dirs["train"]), "--output", str(out), *TRAIN, "--dtype", "bf16"]
    assert main(train) == 0
    trainable = set(seen["model"].trainable_state_dict())
    dtypes = {n: p.dtype for n, p in seen["model"].named_parameters()}
    assert {dtypes[n] for n in trainable} == {torch.float32}
    assert {d for n, d in dtypes.items() if n not in trainable} == {torch.bfloat16}
    assert all(math.isfinite(r["loss"]) for r in _log(out)) and len(_log(out)) == 4
    assert json.loads((out / "run.json").read_text())["train"]["dtype"] == "bf16"
    saved = load_file(out / "checkpoints" / "step-00000004" / "trainable.safetensors")
    assert set(saved) == trainable and {t.dtype for t in saved.values()} == {torch.float32}
    capsys.readouterr()
    more = ["--resume", "--max-steps", "5"]
    for argv in (train[:-2] + more, train[:-1] + ["fp32"] + more):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert "dtype: bf16 -> fp32" in str(exc.value) and "\n" not in str(exc.value)
    assert main(train + more) == 0 and [r["step"] for r in _log(out)] == [1, 2, 3, 4, 5]
    assert main(["eval", "--model", str(out), "--data", str(dirs["test"]), "--output", str(tmp_path / "ev"),
                 "--num-beams", "2", "--max-new-tokens", "4", "--no-progress", "--dtype", "bf16"]) == 0
    assert len(json.loads((tmp_path / "ev" / "pred.json").read_text())) == 3
    imgs = sorted(str(p) for p in (dirs["test"] / "images").iterdir())[:2]
    capsys.readouterr()
    assert main(["generate", "--model", str(out), "--images", *imgs, "--prompt", "{image#1} {image#2} what?",
                 "--num-beams", "1", "--max-new-tokens", "4", "--dtype", "bf16"]) == 0
    assert capsys.readouterr().out.endswith("\n")


def test_train_evaluates_during_training_as_sam_fast_eval_scores(dirs, tmp_path, capsys):
    """--eval-every 2 --eval-data TEST: the history holds steps 2 and 4, scored as `sam-fast eval` scores
    that step's checkpoint with the same settings; run.json records the options, log.jsonl and TensorBoard
    the scores; --overwrite counts the history among the run's own files."""
    from pathlib import PurePosixPath

    from sam_fast.train import outputs

    out = tmp_path / "run"
    tb = ["--report-to", "tensorboard"] if importlib.util.find_spec("tensorboard") is not None else []
    assert main(["train", "--config", "tiny", "--data", str(dirs["train"]), "--output", str(out), *TRAIN, *tb,
                 "--eval-every", "2", "--eval-data", str(dirs["test"]), "--eval-limit", "2",
                 "--eval-max-new-tokens", "4"]) == 0
    assert "eval at step 4 (2 samples): ROUGE_L" in capsys.readouterr().out
    assert "eval_history.json" in {p.name for p in out.iterdir()}
    train = json.loads((out / "run.json").read_text())["train"]
    assert (train["eval_every"], train["eval_data"], train["eval_limit"], train["eval_max_new_tokens"]) == (
        2, str(dirs["test"].resolve()), 2, 4)
    hist = json.loads((out / "eval_history.json").read_text())
    assert [e["step"] for e in hist] == [2, 4]
    assert [r["eval"] for r in _log(out) if "eval" in r] == [e["metrics"] for e in hist]
    ev = tmp_path / "ev"
    assert main(["eval", "--model", str(out / "checkpoints" / "step-00000004"), "--data", str(dirs["test"]),
                 "--output", str(ev), "--limit", "2", "--max-new-tokens", "4", "--no-progress"]) == 0
    metrics = json.loads((ev / "metrics.json").read_text())
    assert {k: metrics[k] for k in ("ROUGE_L", "CIDEr", "Bleu_4", "num_samples")} == {
        k: hist[1]["metrics"][k] for k in ("ROUGE_L", "CIDEr", "Bleu_4", "num_samples")}
    assert hist[1]["samples"] == json.loads((ev / "pred.json").read_text())
    assert PurePosixPath("eval_history.json") in outputs.clear_plan(out)[0]
    if tb:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(out / "tensorboard")).Reload()
        assert [e.step for e in acc.Scalars("eval/CIDEr")] == [2, 4]


def test_bad_eval_data_stops_before_the_first_step_naming_the_file(dirs, tmp_path):
    bad = write_group_captions(tmp_path / "heldout", n_samples=3, size=32, seed=4)
    (bad / "images" / "0001_0.png").unlink()
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        main(["train", "--config", "tiny", "--data", str(dirs["train"]), "--output", str(out), *TRAIN,
              "--eval-every", "2", "--eval-data", str(bad)])
    msg = str(exc.value)
    assert msg.startswith("sam-fast train: --eval-data:") and "0001_0.png" in msg and "\n" not in msg
    assert not (out / "run.json").exists() and not (out / "log.jsonl").exists()
    with pytest.raises(SystemExit, match="eval_every=2 needs eval_data"):
        main(["train", "--config", "tiny", "--data", str(dirs["train"]), "--output", str(out), *TRAIN,
              "--eval-every", "2"])


def test_train_refuses_a_missing_model(dirs, tmp_path):
    with pytest.raises(SystemExit, match=r"^sam-fast train: --model is required .*--model tiny") as exc:
        main(["train", "--data", str(dirs["train"]), "--output", str(tmp_path / "o"), "--no-progress"])
    assert "\n" not in str(exc.value) and not (tmp_path / "o").exists()


def test_train_bad_config_key_override_or_model_is_one_line(dirs, tmp_path):
    base = f"data: {dirs['train']}\noutput: {tmp_path / 'o'}\n"
    cases = [("model: tiny\nbogus_key: 3\n", r"--config .*c\.yaml: unknown option\(s\) 'bogus_key'; known: .*batch_size"),
             ("model: tiny\nmodel_overrides:\n  contxt_mode: shared\n", r"unknown model override\(s\) 'contxt_mode'"),
             ("model: tiny\n1: x\n", r"unknown option\(s\) 1;"),
             (f"model: {tmp_path / 'no-such-model'}\n", r"--model .*no-such-model: no such directory")]
    for text, msg in cases:
        cfg = tmp_path / "c.yaml"
        cfg.write_text(base + text)
        with pytest.raises(SystemExit, match=rf"^sam-fast train: .*{msg}") as exc:
            main(["train", "--config", str(cfg), "--no-progress"])
        assert "\n" not in str(exc.value) and "Traceback" not in str(exc.value)
    assert not (tmp_path / "o").exists()
    cfg.write_text(base + f"model: {dirs['train']}\n")  # a directory, but no model
    with pytest.raises(SystemExit, match=r"^sam-fast train: .*train: not a training output") as exc:
        main(["train", "--config", str(cfg), "--no-progress"])
    assert "\n" not in str(exc.value)


def test_help_texts(capsys):
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    train = sub.choices["train"].format_help()
    assert "{none,bf16,fp16}" in train and "--num-workers" in train and "--cpu-threads" in train
    assert "--report-to {tensorboard,wandb}" in train
    for cmd in ("eval", "generate"):
        model = next(a for a in sub.choices[cmd]._actions if a.dest == "model")
        assert model.help and "training output" in model.help
    assert any(a.dest == "device" for a in sub.choices["generate"]._actions)
    with pytest.raises(SystemExit):
        main(["train", "--amp", "fp8"])
    assert "invalid choice: 'fp8' (choose from 'none', 'bf16', 'fp16')" in capsys.readouterr().err
    for name, p in sub.choices.items():
        text = p.format_help()
        assert "SPEC" not in text and "§" not in text, name


def test_train_with_workers_and_tensorboard_matches(dirs, trained, tmp_path):
    out = tmp_path / "w2"
    extra = ["--num-workers", "2", "--cpu-threads", "1"]
    if importlib.util.find_spec("tensorboard") is not None:
        extra += ["--report-to", "tensorboard"]
    assert main(["train", "--config", "tiny", "--data", str(dirs["train"]), "--output", str(out), *TRAIN, *extra]) == 0
    assert [r["loss"] for r in _log(out)] == [r["loss"] for r in _log(trained)]  # bit for bit
    run = json.loads((out / "run.json").read_text())
    assert run["train"]["num_workers"] == 2 and run["train"]["cpu_threads"] == 1
    if "--report-to" in extra:
        assert run["train"]["report_to"] == ["tensorboard"] and any((out / "tensorboard").iterdir())


def test_metrics_json_records_model_generation_version_and_commit(dirs, trained, tmp_path, capsys):
    import sam_fast

    ev = tmp_path / "eval"
    assert main(["eval", "--model", str(trained), "--data", str(dirs["test"]), "--output", str(ev), "--limit", "1",
                 "--num-beams", "2", "--max-new-tokens", "3", "--no-progress"]) == 0
    m = json.loads((ev / "metrics.json").read_text())
    assert m["model"] == str(trained) and m["sam_fast_version"] == sam_fast.__version__
    assert m["generation"]["num_beams"] == 2 and m["generation"]["max_new_tokens"] == 3
    assert m["generation"]["generation_mode"] == "lavis" and m["generation"]["repetition_penalty"] == 1.5
    assert "git_commit" in m and (m["git_commit"] is None or len(m["git_commit"]) >= 40)
    img = str(next((dirs["test"] / "images").iterdir()))
    assert main(["generate", "--model", str(trained), "--images", img, "--prompt", "what?", "--device", "cpu",
                 "--num-beams", "1", "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.endswith("\n")


def test_init_writes_a_folder_every_loader_reads(dirs, tmp_path, capsys):
    from transformers import AutoModel, AutoProcessor

    from sam_fast import SAM, SAMProcessor

    out = tmp_path / "sam"
    assert main(["init", "tiny", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "generation_config.json", "processor_config.json", "tokenizer.json",
            "qformer_tokenizer"} <= {p.name for p in out.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name != "sam"]  # no build folder left beside it
    model, proc = SAM.from_pretrained(out), SAMProcessor.from_pretrained(out)
    assert type(AutoModel.from_pretrained(out)) is SAM and type(AutoProcessor.from_pretrained(out)) is SAMProcessor
    assert proc.num_query_tokens == model.config.num_query_tokens == 8
    img = str(next((dirs["test"] / "images").iterdir()))
    assert main(["generate", "--model", str(out), "--images", img, "--prompt", "{image#1} what?", "--num-beams", "1",
                 "--max-new-tokens", "2"]) == 0


@pytest.mark.parametrize("existing", ["file", "folder"])
def test_init_refuses_a_non_empty_output_and_touches_nothing(tmp_path, existing):
    out = tmp_path / "sam"
    if existing == "file":
        out.write_text("mine")
    else:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as exc:
        main(["init", "tiny", str(out)])
    msg = str(exc.value.code)
    assert "\n" not in msg and str(out) in msg and ("not empty" in msg or "not a folder" in msg)
    assert (out.read_text() if existing == "file" else (out / "notes.txt").read_text()) == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["sam"]


def test_init_into_an_empty_folder(tmp_path):
    out = tmp_path / "sam"
    out.mkdir()
    assert main(["init", "tiny", str(out), "--seed", "1"]) == 0
    assert (out / "config.json").is_file()


def _convert_sources(tmp_path):
    """A LLaVA file with two records (one image missing) and a VIST file with one story, images beside them."""
    from PIL import Image

    for name, color in (("a.png", (200, 0, 0)), ("b.png", (0, 200, 0)), ("11.jpg", (9, 9, 9)), ("12.jpg", (99, 9, 9))):
        Image.new("RGB", (8, 8), color).save(tmp_path / name)
    turns = [{"from": "human", "value": "<image> and <image>: what differs?"}, {"from": "gpt", "value": "The colour."}]
    (tmp_path / "llava.json").write_text(json.dumps([{"id": "p", "image": ["a.png", "b.png"], "conversations": turns},
                                                     {"id": "q", "image": ["a.png", "gone.png"], "conversations": turns}]))
    anns = [[{"story_id": "s1", "photo_flickr_id": pid, "worker_arranged_photo_order": o, "text": t,
              "original_text": t.upper()}] for o, pid, t in ((1, "12", "then home ."), (0, "11", "we left ."))]
    (tmp_path / "vist.json").write_text(json.dumps({"images": [], "albums": [], "annotations": anns}))


def test_convert_llava_and_vist_commands(tmp_path, capsys):
    _convert_sources(tmp_path)
    out = tmp_path / "ds"
    with pytest.raises(SystemExit) as exc:
        main(["convert", "llava", str(tmp_path / "llava.json"), "--output", str(out), "--no-progress"])
    msg = str(exc.value.code)
    assert msg.startswith("sam-fast convert: ") and "\n" not in msg
    assert "record id 'q': image file" in msg and "gone.png does not exist" in msg and not out.exists()
    assert main(["convert", "llava", str(tmp_path / "llava.json"), "--images", str(tmp_path), "--output", str(out),
                 "--skip-missing", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "1 sample(s), 2 image(s)" in printed and "skipped 1 record(s), 1 for missing image files" in printed
    assert json.loads((out / "annotations.json").read_text()) == [
        {"id": "p", "img_list": ["images/a.png", "images/b.png"], "instruction": "{image#1} and {image#2}: what differs?",
         "output": "The colour."}]
    with pytest.raises(SystemExit, match=r"^sam-fast convert: .*annotations.json exists; pass --overwrite"):
        main(["convert", "vist", str(tmp_path / "vist.json"), "--output", str(out), "--no-progress"])
    assert main(["convert", "vist", str(tmp_path / "vist.json"), "--output", str(out), "--overwrite",
                 "--text-field", "original_text", "--instruction", "{images} Tell it.", "--no-progress"]) == 0
    assert json.loads((out / "annotations.json").read_text()) == [
        {"id": "s1", "img_list": ["images/11.jpg", "images/12.jpg"], "instruction": "{image#1} {image#2} Tell it.",
         "output": "WE LEFT . THEN HOME ."}]


def test_convert_hf_disk_needs_datasets_and_reads_a_split(tmp_path, monkeypatch, capsys):
    import types

    from PIL import Image

    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed: import fails
    (tmp_path / "saved").mkdir()
    argv = ["convert", "hf-disk", str(tmp_path / "saved"), "--output", str(tmp_path / "ds"), "--no-progress"]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    msg = str(exc.value.code)
    assert msg.startswith("sam-fast convert: hf-disk") and "pip install datasets" in msg and "\n" not in msg

    class Splits(dict):
        column_names = {"train": ["image", "question", "answer"]}

    rows = [{"image": Image.new("RGB", (6, 6), (1, 2, 3)), "question": "q?", "answer": "a."}]
    fake = types.SimpleNamespace(load_from_disk=lambda path: Splits(train=rows))
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(SystemExit, match=r"a dataset of splits \['train'\]: choose one with --split$"):
        main(argv)
    assert main([*argv, "--split", "train"]) == 0
    assert json.loads((tmp_path / "ds" / "annotations.json").read_text()) == [
        {"id": 0, "img_list": ["images/0_1.png"], "instruction": "{image#1} q?", "output": "a."}]


@pytest.mark.parametrize("cmd", ["generate", "eval"])
def test_hf_max_length_shorter_than_the_prompt_is_one_line(dirs, tmp_path, cmd):
    # a model folder whose generation_config.json bounds max_length (counting the prompt in "hf" mode)
    out = tmp_path / "sam"
    assert main(["init", "tiny", str(out)]) == 0
    gen = json.loads((out / "generation_config.json").read_text())
    gen.pop("max_new_tokens", None)
    (out / "generation_config.json").write_text(json.dumps({**gen, "max_length": 3}))
    img = str(next((dirs["test"] / "images").iterdir()))
    argv = (["generate", "--model", str(out), "--images", img, "--prompt", "{image#1} what is in this picture?"]
            if cmd == "generate" else
            ["eval", "--model", str(out), "--data", str(dirs["test"]), "--output", str(tmp_path / "ev"),
             "--no-progress"])
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--generation-mode", "hf", "--num-beams", "1"])
    msg = str(exc.value.code)
    assert msg.startswith(f"sam-fast {cmd}: ") and "\n" not in msg
    assert "generation_config.max_length=3 must exceed the prompt's length" in msg
    assert not (tmp_path / "ev").exists()


# `sam-fast [CMD] --help` as it read before build_parser was split into one function per command
# (sha256 of the text printed at COLUMNS=100); a change of any option, help text or choice changes these.
HELP_COMMANDS = ["", "train", "generate", "eval", "cache-features", "explain", "bench", "env", "demo", "synthesize",
                 "export", "init", "convert"]
HELP_SHA256_PY311 = {
    '': 'f202c26a767af974d0439f749e1ef985baf315068aa687dcf17d631fc603abbe',
    'train': 'e65cfdec6de05c990f4cdc10caecd1f965369d4626f26fbf23fe870da1764490',
    'generate': '696cd1f377b82dd47156005e793144dfe5e9afd8d890ce23bb84d2ba3b6002ce',
    'eval': 'ce0179cb84512c005fbbd3645c3c69d25c77676b3b8568344bd309c902b0444c',
    'cache-features': 'a0221b2743f713884ae8b7c605d564e805cbd425957d77f823fe1ba2b9a33b17',
    'explain': '66c28d58a4860ab90f447269905669e14af22f7ec2912990ba03b2a2410044a6',
    'bench': '48e093bf87a281eae09a89b724cc741615115b9bdf71c9e7da1ac02f6effe90a',
    'env': '14748aebe2253064d4c9e24ec9ebd93f77f598fa083f65ede303e06c5dc26b91',
    'demo': '9e38c10259c3eb190f83f380a98aee43d9a69e1990560b582c20c7784c0a4652',
    'synthesize': 'bcd967762e1230ae395bedae5b1169f603f7e6a825a6972fa6e75a5abdb31646',
    'export': '3159f824063fd6f8f7cc8b3c7b14a06a9ba27b3cc041f524209edfcd5204d87b',
    'init': '5a19e6d7d629da6ae868c5c4fe51928199b52a0466c80d0438758941dfe7b655',
    'convert': 'f0e4edd63d01c85612541cd84fc6f7080c107a41f0e22df2a75e151e4cfff031',
}
# the same parsers described field by field (independent of argparse's layout, so checked on every Python)
PARSER_SHA256 = {
    '': '275e7edbb09dad55155664a5d5bd281c28bc2c8cbb1ded6c63b3b20bc3f63d6d',
    'train': '386cd5a796e168f4fb7232920eea9f24fe509e931ddf1e4aad12b6c6a6be0400',
    'generate': 'ed7c5f4f04eacf624993fead2913a7c7515cfa167b9067912a4eecfbb5645558',
    'eval': 'c2b19671dbd90ae3c71bd8f2c2fd77a693b07122e15e45963b35e25222660b28',
    'cache-features': '701418903df36dd9ef17b0dc094285bf1073a52d8f687fc7d82eebd6638f22a5',
    'explain': '9f8fa738f118a60565d6c2de6f26e72369ea1cdf74bdd66cea6fb74a1e6a9c08',
    'bench': 'ddc7483da4e45b65db78cb6a7ab381231ab20c7b96d27ff23ad432d74e59b7ed',
    'env': '26feee10ff785e16cccf29f8888774b2e6619a18d1c18cf5af4c7eb29a13f319',
    'demo': 'f70bbb269b0cd5bb31ab1445298cacafa3789ef340283c6e3cfb50778dde0302',
    'synthesize': '2e15c756c7f638f8a62c94569b7efc25eee2702ce1eee64032f2b11a75debb1f',
    'export': '8ff4b7523ba53bc90eb97cab5f11178b231c7fb073c8da4d027ea3768123fee8',
    'init': 'aec1a79627da2cf970218d41391a588d1f72bf5e61e4950827dc99f50548f8a7',
    'convert': '8fc51a816ecffaabe96ce44a68a5ca53466c4291e0f11cd43ea4dffdbf1dc4c3',
}


def _help_text(cmd: str, capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "100")
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    with pytest.raises(SystemExit) as exc:
        main([cmd, "--help"] if cmd else ["--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


def _describe(parser) -> str:
    """Every field of `parser` and its actions that --help or parsing shows, as stable text."""
    lines = [repr((parser.prog, parser.description, parser.epilog, parser.formatter_class.__name__))]
    for group in parser._action_groups:
        lines.append(repr(("group", group.title, group.description)))
        for a in group._group_actions:
            typ = getattr(a.type, "__name__", repr(a.type))
            lines.append(repr((type(a).__name__, a.option_strings, a.dest, a.nargs, a.const, a.default, typ,
                               a.choices if not isinstance(a.choices, dict) else sorted(a.choices),
                               a.required, a.help, a.metavar)))
    lines.append(repr(("func", getattr(parser.get_default("func"), "__name__", None))))
    return "\n".join(lines)


def _sha256(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="argparse lays help out differently on other Pythons; "
                    "test_parsers_unchanged checks the same content on every version")
@pytest.mark.parametrize("cmd", HELP_COMMANDS)
def test_help_output_unchanged(cmd, capsys, monkeypatch):
    text = _help_text(cmd, capsys, monkeypatch)
    assert _sha256(text) == HELP_SHA256_PY311[cmd], f"`sam-fast {cmd} --help` changed:\n{text}"


@pytest.mark.parametrize("cmd", HELP_COMMANDS)
def test_parsers_unchanged(cmd):
    parser = build_parser()
    if cmd:
        parser = next(a for a in parser._actions if a.dest == "command").choices[cmd]
    text = _describe(parser)
    assert _sha256(text) == PARSER_SHA256[cmd], f"the parser of `sam-fast {cmd}` changed:\n{text}"


# -- signals, full disks ---------------------------------------------------------------------------
def _cache_cmd(dirs, out):
    return ["cache-features", "--model", "tiny", "--data", str(dirs["test"]), "--output", str(out), "--no-progress"]


def _hidden(parent, name):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}.tmp-"))


def test_cache_features_stopped_by_sigterm_leaves_no_build_folder(dirs, tmp_path, monkeypatch, capsys):
    import signal

    from sam_fast.data import feature_cache

    def terminated(*args, **kwargs):  # SIGTERM arrives while the features are being written
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the build")

    monkeypatch.setattr(feature_cache, "_write_cache", terminated)
    assert main(_cache_cmd(dirs, tmp_path / "cache")) == 143
    assert capsys.readouterr().err.strip() == "sam-fast cache-features: stopped by SIGTERM before it finished"
    assert _hidden(tmp_path, "cache") == [] and not (tmp_path / "cache").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the command's handler is gone again


def test_cache_features_removes_the_build_folders_of_killed_builds(dirs, tmp_path):
    """SIGKILL (or a lost node) leaves a build folder no handler could remove: the next build beside
    it removes those whose process has exited on this host, and keeps a live one's."""
    from sam_fast.data.feature_cache import _host_tag

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for pid in (dead.pid, os.getpid()):
        folder = tmp_path / f".cache.tmp-{pid}@{_host_tag()}-abc123"
        folder.mkdir()
        (folder / "shard-00000.safetensors").write_bytes(b"x" * 1000)
    other_host = tmp_path / f".cache.tmp-{dead.pid}@00000000-abc123"
    other_host.mkdir()
    assert main(_cache_cmd(dirs, tmp_path / "cache")) == 0
    assert _hidden(tmp_path, "cache") == sorted([f".cache.tmp-{os.getpid()}@{_host_tag()}-abc123", other_host.name])


def test_cache_features_refuses_a_cache_larger_than_the_free_space(dirs, tmp_path, monkeypatch):
    import shutil as shutil_module

    from sam_fast.data import feature_cache

    usage = shutil_module.disk_usage(tmp_path)
    monkeypatch.setattr(feature_cache.shutil, "disk_usage", lambda p: usage._replace(free=10_000))
    with pytest.raises(SystemExit, match=r"^sam-fast cache-features: .*cache: the cache needs about [\d.]+ [kM]B "
                                         r"\(\d+ images x 1 view\(s\) x \[\d+, \d+\] float16\) but its file system has "
                                         r"10 kB free; free space"):
        main(_cache_cmd(dirs, tmp_path / "cache"))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_full_disk_during_a_checkpoint_is_one_line_and_leaves_no_partial_folder(dirs, tmp_path, monkeypatch):
    import errno

    from sam_fast.train import checkpoint

    real = checkpoint.save_file
    calls = []

    def filling(tensors, path, **kw):  # the disk fills up while the second checkpoint is written
        calls.append(path)
        if len(calls) == 3:
            with open(path, "wb") as f:
                f.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real(tensors, path, **kw)

    monkeypatch.setattr(checkpoint, "save_file", filling)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        main(["train", "--config", "tiny", "--data", str(dirs["train"]), "--output", str(out), *TRAIN])
    msg = str(exc.value.code)
    assert msg.startswith("sam-fast train: no space left on the device writing ") and "\n" not in msg, msg
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step-00000002"]  # no .tmp-* left
    from sam_fast.train import load_checkpoint

    assert load_checkpoint(ckpts / "step-00000002")[1]["step"] == 2  # the last good one is intact


def test_disk_full_errors_wrapped_by_libraries_are_recognised():
    import errno

    from sam_fast.cli import _disk_full

    assert _disk_full(OSError(errno.ENOSPC, "No space left on device", "/x/y")) == \
        "no space left on the device writing /x/y"
    wrapped = RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space" })')
    assert _disk_full(wrapped) == "no space left on the device"
    try:
        try:
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
        except OSError as inner:
            raise RuntimeError("file write failed") from inner
    except RuntimeError as outer:
        assert _disk_full(outer) == "the disk quota is exceeded"
    assert _disk_full(ValueError("something else")) is None and _disk_full(OSError(errno.EACCES, "denied")) is None


def test_sigint_while_a_command_starts_is_one_line(dirs, tmp_path, monkeypatch, capsys):
    from sam_fast.models import directory

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(directory, "build_builtin", interrupted)  # Ctrl-C while the model is being built
    assert main(_cache_cmd(dirs, tmp_path / "cache")) == 130
    assert capsys.readouterr().err.strip() == "sam-fast cache-features: stopped by SIGINT before it finished"


@pytest.mark.parametrize("damage, says", [
    ("base/model.safetensors", r"cannot load it \(SafetensorError: "),
    ("base/config.json", "nested too deeply"),
    ("tokenizer/llm/tokenizer_config.json", "nested too deeply"),
])
def test_a_damaged_model_folder_is_one_line_naming_it(dirs, trained, tmp_path, damage, says):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    target = run / damage
    if damage.endswith(".safetensors"):
        target.write_bytes(target.read_bytes()[:1000])  # truncated
    else:
        target.write_text("[" * 100_000 + "]" * 100_000)  # nested past the JSON parser's recursion limit
    image = sorted((dirs["test"] / "images").iterdir())[0]
    with pytest.raises(SystemExit, match=f"^sam-fast generate: (--model )?{run}.*: .*{says}") as exc:
        main(["generate", "--model", str(run), "--images", str(image), "--prompt", "what?", "--max-new-tokens", "2"])
    assert "\n" not in str(exc.value.code)


def test_export_writes_a_standalone_sam_folder(dirs, trained, tmp_path, capsys):
    """`sam-fast export RUN OUT`: OUT alone (the run removed) gives the run's model, processor and
    generate output; the message names the step and checkpoint exported."""
    import torch

    from sam_fast import SAM
    from sam_fast.models.directory import load_model_dir
    from sam_fast.processing import SAMProcessor

    run = shutil.copytree(trained, tmp_path / "run")
    imgs = sorted(str(p) for p in (dirs["test"] / "images").iterdir())[:2]
    ask = ["--images", *imgs, "--prompt", "{image#1} {image#2} what is common?", "--num-beams", "1",
           "--max-new-tokens", "4"]
    assert main(["generate", "--model", str(run), *ask]) == 0
    from_run = capsys.readouterr().out
    ran, _, _ = load_model_dir(run)
    out = tmp_path / "exported"
    assert main(["export", str(run), str(out)]) == 0
    said = capsys.readouterr().out
    assert "at step 4 (step-00000004)" in said and str(out) in said
    shutil.rmtree(run)

    assert main(["generate", "--model", str(out), *ask]) == 0
    assert capsys.readouterr().out == from_run
    got = SAM.from_pretrained(out).state_dict()
    assert sorted(got) == sorted(ran.state_dict())
    for k, v in ran.state_dict().items():
        assert torch.equal(got[k], v), k
    processor = SAMProcessor.from_pretrained(out)
    assert processor.num_query_tokens == ran.config.num_query_tokens
    assert processor.image_token_index == ran.config.image_token_index


def test_export_refuses_a_non_empty_output(trained, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match=r"^sam-fast export: .*taken exists and is not an empty folder") as exc:
        main(["export", str(trained), str(out)])
    assert "\n" not in str(exc.value)
    assert sorted(os.listdir(out)) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-export")]
    (out / "notes.txt").unlink()  # an empty folder is fine
    assert main(["export", str(trained), str(out)]) == 0
    assert (out / "config.json").is_file() and (out / "processor_config.json").is_file()
