"""README.md runs as printed: every ```python and ```bash/```sh/```shell block, in order, in one
temporary folder, on the tiny model (the quick start's `sam-fast init tiny out/sam`), with a.jpg and
b.jpg there for the examples that open them. A block that cannot run here (real weights, a GPU, the
network, long runs) carries ``<!-- not run: REASON -->`` on the line before it, visible to readers
of the source; such a marker without a reason, or away from a block, fails."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RUNNABLE = {"python": "python", "bash": "shell", "sh": "shell", "shell": "shell"}
FENCE = re.compile(r"^```(\S*)\s*$")
NOT_RUN = re.compile(r"^<!--\s*not run:(.*?)-->\s*$")
BLOCK_TIMEOUT_S = 120


def _blocks(text: str) -> list[dict]:
    """Every fenced block: its language, first line number (1-based), code, and the reason of a
    ``not run`` marker on the last non-blank line before it (None: no marker)."""
    lines, blocks, i = text.splitlines(), [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = NOT_RUN.match(before.strip())
        blocks.append({"lang": m.group(1), "line": i + 1, "code": "\n".join(lines[i + 1 : end]),
                       "skip": marker.group(1).strip() if marker else None})
        i = end + 1
    return blocks


def test_parser_finds_blocks_and_markers():
    text = "x\n\n<!-- not run: needs weights -->\n```python\na = 1\n```\n\n```bash\necho hi\n```\n```\ntree\n```\n"
    got = [(b["lang"], b["line"], b["code"], b["skip"]) for b in _blocks(text)]
    assert got == [("python", 4, "a = 1", "needs weights"), ("bash", 8, "echo hi", None), ("", 11, "tree", None)]


def test_every_skipped_block_says_why_and_every_marker_is_on_a_block():
    text = README.read_text(encoding="utf-8")
    blocks = _blocks(text)
    for b in blocks:
        assert b["skip"] != "", f"README.md line {b['line']}: a 'not run' marker needs a reason"
    markers = [n for n, line in enumerate(text.splitlines(), 1) if "not run" in line and line.startswith("<!--")]
    assert len(markers) == sum(b["skip"] is not None for b in blocks), "a 'not run' marker not right before a block"
    runnable = [b for b in blocks if b["lang"] in RUNNABLE and b["skip"] is None]
    assert any("sam-fast init tiny out/sam" in b["code"] for b in runnable)
    assert sum(RUNNABLE[b["lang"]] == "python" for b in runnable) >= 3


def _run(block: dict, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    if RUNNABLE[block["lang"]] == "python":
        cmd = [sys.executable, "-c", block["code"]]
    else:  # `sam-fast` as the checkout's command line, whatever is installed
        prelude = f'set -euo pipefail\nsam-fast() {{ "{sys.executable}" -m sam_fast.cli "$@"; }}\n'
        cmd = ["bash", "-c", prelude + block["code"]]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)


def test_readme_blocks_run_as_printed(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a.jpg", "b.jpg"):  # the user's own pictures in the examples
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(tmp_path / name)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    blocks = [b for b in _blocks(README.read_text(encoding="utf-8")) if b["lang"] in RUNNABLE and b["skip"] is None]
    assert blocks
    for b in blocks:
        res = _run(b, tmp_path, env)
        assert res.returncode == 0, (f"README.md block at line {b['line']} ({b['lang']}) failed "
                                     f"(exit {res.returncode}):\n{res.stderr[-3000:]}")
    assert (tmp_path / "out" / "sam" / "processor_config.json").is_file()
    assert (tmp_path / "out" / "mine" / "config.json").is_file()
    assert (tmp_path / "out" / "hf" / "checkpoint-2").is_dir()
