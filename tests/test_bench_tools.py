"""bench/report.py and bench/compare.py on synthetic pytest-benchmark JSON."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(speedups, breakdown=True):
    benches = []
    for n, s in speedups.items():
        extra = {"speedup_vs_released": s, "images_per_sample": n, "gbps": 10.0 * n, "copy_gbps": 50.0}
        if breakdown:
            extra["breakdown"] = {"vision": 0.01, "qwformer": 0.002, "llm": 0.03}
        benches.append({"name": f"bench_encode_images[{n}]", "fullname": f"bench/x.py::bench_encode_images[{n}]",
                        "stats": {"median": 0.0123 * n}, "extra_info": extra})
    return {"machine_info": {"device": "cpu-test", "torch": "2.13.0", "triton": "3.7.1", "commit": "abc"},
            "datetime": "2026-11-22T00:00:00", "benchmarks": benches}


def test_compare_fails_only_when_a_ratio_drops_more_than_tolerance(tmp_path):
    compare = _module("compare")
    base = _run({2: 1.5, 4: 2.0})
    ok = _run({2: 1.40, 4: 2.5})  # -6.7%, +25%
    bad = _run({2: 1.30, 4: 2.0})  # -13.3%
    (tmp_path / "base.json").write_text(json.dumps(base))
    (tmp_path / "ok.json").write_text(json.dumps(ok))
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    assert compare.main([str(tmp_path / "ok.json"), str(tmp_path / "base.json")]) == 0
    assert compare.main([str(tmp_path / "bad.json"), str(tmp_path / "base.json")]) == 1
    lines, failures = compare.compare(bad, base)
    assert len(failures) == 1 and "[2]" in failures[0] and "-13.3%" in failures[0]


def test_report_writes_table_plots_and_readme_block(tmp_path):
    pytest.importorskip("matplotlib")
    report = _module("report")
    src = tmp_path / "cpu-test-2026-11-22.json"
    src.write_text(json.dumps(_run({2: 1.5, 4: 2.0, 8: 2.6})))
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n## Speed\n\n<!-- speed:start -->\nold\n<!-- speed:end -->\n\n## After\n")
    assert report.main([str(src), "--readme", str(readme)]) == 0
    table = (tmp_path / "cpu-test-2026-11-22.md").read_text()
    assert "device cpu-test" in table and "vs_released 2.60x" in table and "24.6 ms" in table
    text = readme.read_text()
    assert "old" not in text and "vs_released 1.50x" in text and text.endswith("## After\n")
    for suffix in ("speedup", "bandwidth", "train-breakdown"):
        png = tmp_path / f"cpu-test-2026-11-22-{suffix}.png"
        assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
