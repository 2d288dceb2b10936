"""Turn a pytest-benchmark JSON file into a markdown table, PNG plots and the README's Speed table.

    python bench/report.py bench/results/<device>-<date>.json [--readme README.md]

Conventions the benchmarks follow (``benchmark.extra_info``):

- ``speedup_<what>``: a ratio measured side by side in the same run, higher is better (e.g.
  ``speedup_vs_naive = t_naive / t_fast``); these are the numbers `compare.py` tracks.
- ``images_per_sample``: x value for the speed-up curve.
- ``gbps`` and ``copy_gbps``: achieved bandwidth and the measured copy floor on the same device.
- ``breakdown``: ``{"vision": s, "qwformer": s, "llm": s}`` seconds of one training step.
- ``peak_memory_mb``, ``samples_per_s``, ``tokens_per_s``: shown in the table when present.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
from pathlib import Path

START, END = "<!-- speed:start -->", "<!-- speed:end -->"


def load(path) -> dict:
    return json.loads(Path(path).read_text())


def stamp(data: dict) -> str:
    mi = data.get("machine_info", {})
    when = data.get("datetime", dt.datetime.now().isoformat())[:10]
    return (f"device {mi.get('device', '?')}, torch {mi.get('torch', '?')}, triton {mi.get('triton', '?')}, "
            f"transformers {mi.get('transformers', '?')}, commit {mi.get('commit', '?')}, {when}")


def _fmt_time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds * 1e9:.3g} ns"


def markdown_table(data: dict) -> str:
    rows = ["| benchmark | median | ratios (same run) | other |", "| --- | --- | --- | --- |"]
    for b in data.get("benchmarks", []):
        extra = b.get("extra_info", {})
        ratios = ", ".join(f"{k[len('speedup_'):]} {v:.2f}x" for k, v in sorted(extra.items())
                           if k.startswith("speedup_") and isinstance(v, (int, float)))
        other = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in sorted(extra.items())
                          if k in ("peak_memory_mb", "samples_per_s", "tokens_per_s", "gbps", "copy_gbps"))
        rows.append(f"| `{b['name']}` | {_fmt_time(b['stats']['median'])} | {ratios or '-'} | {other or '-'} |")
    return f"Measured on {stamp(data)}.\n\n" + "\n".join(rows) + "\n"


def plots(data: dict, out_dir: Path, prefix: str) -> list[Path]:
    """Up to three PNGs; only those the data can fill are written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    benches = data.get("benchmarks", [])

    def save(fig, ax, xlabel: str, suffix: str) -> None:
        ax.set_xlabel(xlabel)
        ax.set_title(stamp(data), fontsize=7)
        ax.legend(fontsize=7)
        path = out_dir / f"{prefix}-{suffix}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    curves: dict[str, list[tuple[float, float]]] = {}
    for b in benches:
        extra = b.get("extra_info", {})
        if "images_per_sample" not in extra:
            continue
        x = extra["images_per_sample"]
        others = [str(v) for v in (b.get("params") or {}).values() if v != x]  # one curve per other setting
        group = re.sub(r"\[.*\]$", "", b["name"]) + (f"[{', '.join(others)}]" if others else "")
        for k, v in extra.items():
            if k.startswith("speedup_"):
                curves.setdefault(f"{group}: {k[8:]}", []).append((extra["images_per_sample"], v))
    if curves:
        fig, ax = plt.subplots(figsize=(7, 4))
        for label, pts in sorted(curves.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_ylabel("speed-up (x)")
        save(fig, ax, "images per sample", "speedup")

    bw = [(b["name"], b["extra_info"]["gbps"], b["extra_info"].get("copy_gbps")) for b in benches
          if "gbps" in b.get("extra_info", {})]
    if bw:
        fig, ax = plt.subplots(figsize=(7, 0.5 + 0.4 * len(bw)))
        names = [n for n, _, _ in bw]
        ax.barh(names, [g for _, g, _ in bw], label="achieved")
        floors = [c for _, _, c in bw if c]
        if floors:
            ax.axvline(max(floors), color="red", ls="--", label="copy floor")
        save(fig, ax, "GB/s", "bandwidth")

    parts = [(b["name"], b["extra_info"]["breakdown"]) for b in benches if "breakdown" in b.get("extra_info", {})]
    if parts:
        fig, ax = plt.subplots(figsize=(7, 0.5 + 0.4 * len(parts)))
        left = [0.0] * len(parts)
        for key in ("vision", "qwformer", "llm"):
            vals = [p.get(key, 0.0) * 1e3 for _, p in parts]
            ax.barh([n for n, _ in parts], vals, left=left, label=key)
            left = [a + b for a, b in zip(left, vals)]
        save(fig, ax, "ms per training step", "train-breakdown")
    return written


def update_readme(readme: Path, table: str) -> None:
    text = readme.read_text()
    block = f"{START}\n{table}{END}"
    if START in text and END in text:
        text = re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + f"\n\n## Speed\n\n{block}\n"
    readme.write_text(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", help="pytest-benchmark JSON (from --benchmark-json)")
    ap.add_argument("--out-dir", default=None, help="where the .md and .png go (default: next to the JSON)")
    ap.add_argument("--readme", default=None, help="README to update between the speed markers")
    args = ap.parse_args(argv)
    src = Path(args.json)
    data = load(src)
    out = Path(args.out_dir) if args.out_dir else src.parent
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(data)
    (out / f"{src.stem}.md").write_text(table)
    written = plots(data, out, src.stem)
    if args.readme:
        update_readme(Path(args.readme), table)
    print(table)
    for p in written:
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
