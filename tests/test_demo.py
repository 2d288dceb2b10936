"""The demo runs the whole pipeline (smoke test: a few steps; `make demo` runs the full one)."""

from sam_fast import demo


def test_demo_smoke(tmp_path, capsys):
    r = demo.main(steps=3, batch=2, seed=0, workdir=str(tmp_path))
    assert r["visual_tokens_shape"] == (11, 8, 64)
    assert {"ROUGE_L", "CIDEr", "Bleu_4"} <= set(r["metrics_after"])
    assert (tmp_path / "eval_after" / "pred.json").is_file() and (tmp_path / "run" / "log.jsonl").is_file()
    out = capsys.readouterr().out
    assert "ROUGE_L" in out and "extension sam_fast._C" in out
