"""Turn a pytest-benchmark JSON file into a markdown table, PNG plots and docs/performance.md's Speed table.

    python bench/report.py bench/results/<device>-<date>.json [--doc docs/performance.md]

Conventions the benchmarks follow (``benchmark.extra_info``):

- ``speedup_<what>``: a ratio measured side by side in the same run, higher is better (e.g.
  ``speedup_vs_naive = t_naive / t_fast``); these are the numbers `compare.py` tracks.
- ``images_per_sample``: x value for the speed-up curve.
- ``gbps`` and ``copy_gbps``: achieved bandwidth and the measured copy floor on the same device.
- ``breakdown``: ``{"vision": s, "qwformer": s, "llm": s}`` seconds of one training step.
- memory: keys ending ``_mb`` / ``_mib`` / ``_bytes`` (e.g. ``peak_step_alloc_mb``, what torch allocates
  during one step); older results' ``peak_memory_mb`` was the process RSS and is shown as
  ``process_rss_mb``. ``samples_per_s``, ``tokens_per_s``: shown in the table when present.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import textwrap
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


#: keys shown in the table's "other" column (besides memory figures)
THROUGHPUT = ("samples_per_s", "tokens_per_s", "gbps", "copy_gbps")
#: old results stored the process RSS (torch and Python included) under this name
RSS_ALIASES = {"peak_memory_mb": "process_rss_mb"}


def _is_ratio(key: str) -> bool:
    return key.startswith("speedup_") or "_vs_" in key


def _is_memory(key: str) -> bool:
    return key.endswith(("_mb", "_mib", "_bytes")) and not _is_ratio(key)


def markdown_table(data: dict) -> str:
    """The results as a markdown table: median time, the ratios measured side by side
    (``speedup_*`` with the prefix dropped, other ``*_vs_*`` by full name) and the throughput and
    memory figures. Memory stored by older runs as ``peak_memory_mb`` (the process RSS, torch
    included) is shown as ``process_rss_mb``."""
    rows = ["| benchmark | median | ratios (same run) | other |", "| --- | --- | --- | --- |"]
    for b in data.get("benchmarks", []):
        extra = {RSS_ALIASES.get(k, k): v for k, v in b.get("extra_info", {}).items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)}
        ratios = ", ".join(f"{k.removeprefix('speedup_')} {v:.2f}x" for k, v in sorted(extra.items()) if _is_ratio(k))
        other = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in sorted(extra.items())
                          if k in THROUGHPUT or _is_memory(k))
        rows.append(f"| `{b['name']}` | {_fmt_time(b['stats']['median'])} | {ratios or '-'} | {other or '-'} |")
    return f"Measured on {stamp(data)}.\n\n" + "\n".join(rows) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, ax, data: dict, title: str, note: str = "") -> None:
    """Title, legend outside the axes (right), and the run's stamp (and `note`) under the plot."""
    fig.suptitle(title, fontsize=12, fontweight="bold", x=0.02, ha="left")
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0, fontsize=9,
                  frameon=False)
    height = fig.get_figheight()  # room in inches for the x label below and the title above
    fig.subplots_adjust(bottom=0.8 / height, top=1 - 0.75 / height)
    caption = textwrap.fill(stamp(data), 110) + (f"\n{textwrap.fill(note, 110)}" if note else "")
    fig.text(0.02, 0.0, caption, fontsize=7.5, color="dimgray", ha="left", va="top")


def _iqr_scale(b: dict) -> tuple[float, float]:
    """(q1 / median, q3 / median) of the benchmark's timed rounds (1, 1 when not stored)."""
    st = b.get("stats", {})
    med = st.get("median") or 0.0
    if not med or "q1" not in st or "q3" not in st:
        return 1.0, 1.0
    return st["q1"] / med, st["q3"] / med


def ratio_error(extra: dict, key: str) -> tuple[float, float]:
    """(below, above) the ratio ``extra[key]`` for an error bar: its per-round IQR from
    ``ratio_spread`` (`benchutil.record_ratio`); older results stored the fastest-round ratio and
    ``median_of_round_ratios``, whose gap is drawn instead; (0, 0) when neither is there."""
    v = extra[key]
    spread = (extra.get("ratio_spread") or {}).get(key)
    if isinstance(spread, dict) and "q1" in spread:
        return max(0.0, v - spread["q1"]), max(0.0, spread["q3"] - v)
    m = extra.get("median_of_round_ratios", v)
    return v - min(v, m), max(v, m) - v


def speedup_figure(data: dict):
    """Speed-up over the compared implementation against images per sample, one curve per
    benchmark and setting; error bars: the IQR of the per-round ratios (`ratio_error`). None when no
    benchmark has ``images_per_sample``."""
    curves: dict[str, list[tuple[float, float, float, float]]] = {}
    for b in data.get("benchmarks", []):
        extra = b.get("extra_info", {})
        if "images_per_sample" not in extra:
            continue
        x = extra["images_per_sample"]
        others = [str(v) for v in (b.get("params") or {}).values() if v != x]  # one curve per other setting
        group = re.sub(r"\[.*\]$", "", b["name"]) + (f" [{', '.join(others)}]" if others else "")
        for k, v in extra.items():
            if k.startswith("speedup_"):
                curves.setdefault(f"{group}: {k[8:]}", []).append((x, v, *ratio_error(extra, k)))
    if not curves:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 5))
    for label, pts in sorted(curves.items()):
        pts.sort()
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        lo = [lo for _, _, lo, _ in pts]
        hi = [hi for _, _, _, hi in pts]
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=4, label=label)
    ax.axhline(1.0, color="grey", lw=1, ls="--", label="1x = as fast as the compared code")
    ax.set_xticks(sorted({p[0] for pts in curves.values() for p in pts}))
    ax.set_ylim(bottom=0)
    ax.set_xlabel("images per sample (N)")
    ax.set_ylabel("speed-up (x, time of compared code / ours)")
    ax.grid(alpha=0.3)
    _finish(fig, ax, data, "Speed-up over the released code, by images per sample",
            "Points: median of the per-round ratios of the two sides, timed alternately in one run; error "
            "bars: their interquartile range.")
    return fig


def bandwidth_figure(data: dict):
    """Achieved memory bandwidth of each benchmark with ``gbps`` next to the copy floor measured
    on the same device (``copy_gbps``: copying the same bytes); error bars from the interquartile
    range of the timed rounds. None when no benchmark has ``gbps``."""
    bw = [b for b in data.get("benchmarks", []) if "gbps" in b.get("extra_info", {})]
    if not bw:
        return None
    plt = _pyplot()
    n = len(bw)
    fig, ax = plt.subplots(figsize=(10, max(3.2, 1.6 + 1.0 * n)))
    h = 0.38
    ys = list(range(n))
    achieved = [b["extra_info"]["gbps"] for b in bw]
    q1s, q3s = zip(*(_iqr_scale(b) for b in bw))
    err = [[g - g / q3 for g, q3 in zip(achieved, q3s)], [g / q1 - g for g, q1 in zip(achieved, q1s)]]
    ax.barh([y - h / 2 for y in ys], achieved, height=h, xerr=err, capsize=4, color="tab:blue",
            label="achieved (median; error bar: IQR of rounds)")
    floors = [b["extra_info"].get("copy_gbps") or 0.0 for b in bw]
    if any(floors):
        ax.barh([y + h / 2 for y in ys], floors, height=h, color="tab:gray",
                label="copy of the same bytes (memory floor)")
    top = max(max(a + e for a, e in zip(achieved, err[1])), max(floors))
    for y, a, e, f in zip(ys, achieved, err[1], floors):
        ax.text(a + e, y - h / 2, f"  {a:.1f} GB/s", va="center", fontsize=9)
        if f:
            ax.text(f, y + h / 2, f"  {f:.1f} GB/s", va="center", fontsize=9)
    ax.set_yticks(ys, [b["name"] for b in bw])
    ax.invert_yaxis()
    ax.set_xlim(0, top * 1.25)
    ax.set_xlabel("bandwidth (GB/s: bytes read + written per second)")
    ax.grid(axis="x", alpha=0.3)
    _finish(fig, ax, data, "Memory bandwidth achieved vs a plain copy of the same bytes")
    return fig


#: the end-to-end benchmarks whose ratios get their own plot (their x axis is not images per sample)
E2E = ("bench_train_step", "bench_generate", "bench_llm_packing")


def _e2e_bars(data: dict) -> list[tuple[str, float, float, float, str]]:
    """(label, ratio, below, above, note) for every ``speedup_*`` of the `E2E` benchmarks; the note
    gives generation's new tokens/s, ours and the compared path's."""
    bars = []
    for b in data.get("benchmarks", []):
        extra = b.get("extra_info", {})
        if not b["name"].startswith(E2E):
            continue
        for k, v in sorted(extra.items()):
            if k.startswith("speedup_") and isinstance(v, (int, float)):
                note = ""
                if isinstance(extra.get("tokens_per_s"), (int, float)):
                    before = extra.get("tokens_per_s_before")
                    note = f"{extra['tokens_per_s']:.3g} new tok/s" + (f" vs {before:.3g} before" if before else "")
                bars.append((f"{b['name']}: {k[8:]}", v, *ratio_error(extra, k), note))
    return bars


def e2e_ratio_figure(data: dict):
    """The training step's and generation's speed-ups (``speedup_*`` of the `E2E` benchmarks), one
    bar each with the IQR of the per-round ratios as error bar and generation's tokens/s beside
    it. None when the run has none."""
    bars = _e2e_bars(data)
    if not bars:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, max(3.2, 1.6 + 0.45 * len(bars))))
    ys = list(range(len(bars)))
    values = [b[1] for b in bars]
    err = [[b[2] for b in bars], [b[3] for b in bars]]
    colors = ["tab:green" if b[0].startswith("bench_train_step") else "tab:purple"
              if b[0].startswith("bench_generate") else "tab:blue" for b in bars]
    ax.barh(ys, values, xerr=err, capsize=4, color=colors, height=0.6)
    for y, (_, v, _, hi, note) in zip(ys, bars):
        ax.text(v + hi, y, f"  {v:.2f}x" + (f"  ({note})" if note else ""), va="center", fontsize=8.5)
    for color, label in (("tab:green", "training step"), ("tab:purple", "generation"), ("tab:blue", "LLM packing")):
        if color in colors:
            ax.barh([0], [0], color=color, label=label)
    ax.axvline(1.0, color="grey", lw=1, ls="--", label="1x = as fast as the compared code")
    ax.set_yticks(ys, [b[0] for b in bars], fontsize=8.5)
    ax.invert_yaxis()
    ax.set_xlim(0, max(v + hi for _, v, _, hi, _ in bars) * 1.45)
    ax.set_xlabel("speed-up (x, time of compared code / ours)")
    ax.grid(axis="x", alpha=0.3)
    _finish(fig, ax, data, "End to end: training step and generation speed-ups",
            "Bars: median of the per-round ratios of the two sides, timed alternately in one run; error bars: "
            "their interquartile range.")
    return fig


PARTS = (("vision", "frozen ViT forward"), ("qwformer", "Q/W-former fwd + bwd"), ("llm", "LLM fwd + bwd"))


def breakdown_figure(data: dict):
    """One training step split into its parts (ms), one panel per benchmark with ``breakdown``,
    each on its own scale; the whole step's median with the interquartile range of its rounds is
    drawn above the parts. None when no benchmark has ``breakdown``."""
    runs = [b for b in data.get("benchmarks", []) if "breakdown" in b.get("extra_info", {})]
    if not runs:
        return None
    plt = _pyplot()
    n = len(runs)
    fig, axes = plt.subplots(n, 1, figsize=(10, 1.4 + 1.7 * n), squeeze=False)
    colors = dict(zip((k for k, _ in PARTS), ("tab:green", "tab:orange", "tab:blue")))
    for ax, b in zip(axes[:, 0], runs):
        parts = b["extra_info"]["breakdown"]
        total = sum(parts.get(k, 0.0) for k, _ in PARTS) * 1e3
        left = 0.0
        for key, label in PARTS:
            ms = parts.get(key, 0.0) * 1e3
            ax.barh([0], [ms], left=left, height=0.6, color=colors[key], label=label)
            if total and ms / total >= 0.07:
                ax.text(left + ms / 2, 0, f"{ms:.3g} ms\n{ms / total:.0%}", ha="center", va="center", fontsize=8,
                        color="white")
            left += ms
        st = b.get("stats", {})
        step = st.get("median", 0.0) * 1e3
        if step:
            lo, hi = step - st.get("q1", st["median"]) * 1e3, st.get("q3", st["median"]) * 1e3 - step
            ax.errorbar([step], [0.55], xerr=[[lo], [hi]], fmt="D", color="black", capsize=4,
                        label="whole step (median, IQR of rounds)")
        ax.set_yticks([0], [b["name"]])
        ax.set_ylim(-0.6, 0.9)
        ax.set_xlim(0, max(total, step + (hi if step else 0)) * 1.08)
        ax.set_xlabel("ms per training step")
        ax.grid(axis="x", alpha=0.3)
    fig.subplots_adjust(hspace=0.9)
    _finish(fig, axes[0, 0], data, "Where one training step's time goes (each panel on its own scale)",
            "Parts: median of separate timed calls (ViT forward; Q/W-former forward + backward; LLM forward + "
            "backward); their sum can differ from the whole step.")
    return fig


def plots(data: dict, out_dir: Path, prefix: str) -> list[Path]:
    """Write `<prefix>-speedup.png`, `-e2e-ratios.png`, `-bandwidth.png` and `-train-breakdown.png`
    into `out_dir`, only those the data can fill; returns their paths."""
    written = []
    for suffix, make in (("speedup", speedup_figure), ("e2e-ratios", e2e_ratio_figure),
                         ("bandwidth", bandwidth_figure), ("train-breakdown", breakdown_figure)):
        fig = make(data)
        if fig is None:
            continue
        path = out_dir / f"{prefix}-{suffix}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight", pad_inches=0.2)
        _pyplot().close(fig)
        written.append(path)
    return written


def update_speed_table(doc: Path, table: str) -> None:
    """Replace the block between the speed markers of `doc` (or append a Speed section)."""
    text = doc.read_text()
    block = f"{START}\n{table}{END}"
    if START in text and END in text:
        text = re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + f"\n\n## Speed\n\n{block}\n"
    doc.write_text(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", help="pytest-benchmark JSON (from --benchmark-json)")
    ap.add_argument("--out-dir", default=None, help="where the .md and .png go (default: next to the JSON)")
    ap.add_argument("--doc", "--readme", dest="doc", default=None,
                    help="markdown file to update between the speed markers (docs/performance.md)")
    args = ap.parse_args(argv)
    src = Path(args.json)
    data = load(src)
    out = Path(args.out_dir) if args.out_dir else src.parent
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(data)
    (out / f"{src.stem}.md").write_text(table)
    written = plots(data, out, src.stem)
    if args.doc:
        update_speed_table(Path(args.doc), table)
    print(table)
    for p in written:
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
