"""Run the timed benchmark suite one file per process and merge the results into one JSON.

    python bench/run.py --json bench/results/<device>-<date>.json [-k EXPR]

Why one process per file: a file's ratios depend on the process's memory state. Measured in one
long process, context_reweight's ratios were less than half those of the file run alone after the
end-to-end benchmarks had allocated and freed gigabytes, and the scaled train step read 1.27x in
the full run against 1.45x alone. Each ``bench/**/bench_*.py`` (in `ORDER`) runs as its own
``pytest --benchmark-only`` writing a part JSON; `merge` joins the parts into the one JSON that
report.py, compare.py and ``make bench-compare`` read, and the merged ratios, memory figures and
any busy-machine warning are printed at the end.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
#: ops first, then models, then whole steps (a failing quick file shows up early)
ORDER = ("ops", "models", "e2e")
#: pytest's exit status when -k (or a skip-only file) leaves nothing to run
NO_TESTS = 5


class MergeError(ValueError):
    """Parts that cannot be one run (another device, the same benchmark twice)."""


def bench_files(root: Path = BENCH) -> list[Path]:
    """The benchmark files in `ORDER`, sorted by name within each folder."""
    return [p for sub in ORDER for p in sorted((root / sub).glob("bench_*.py"))]


def merge(parts: list[tuple[str, dict]]) -> dict:
    """One pytest-benchmark JSON from the `(file, data)` parts of one run: benchmarks in part
    order; machine_info, commit_info and datetime of the first part, with the load average at the
    first part's start and the last part's end and every part's busy warning (prefixed with its
    file); each part's load figures under ``machine_info["parts"]``. A second device or a
    benchmark in two parts raises `MergeError`."""
    if not parts:
        raise MergeError("no benchmark results to merge (every file skipped or deselected?)")
    first = parts[0][1]
    merged = {k: v for k, v in first.items() if k != "benchmarks"}
    info = dict(first.get("machine_info", {}))
    seen: dict[str, str] = {}
    benchmarks, warnings, loads = [], [], []
    for name, data in parts:
        mi = data.get("machine_info", {})
        if mi.get("device") != info.get("device"):
            raise MergeError(f"{name}: device {str(mi.get('device'))[:80]!r} differs from "
                             f"{parts[0][0]}'s {str(info.get('device'))[:80]!r}")
        for b in data.get("benchmarks", []):
            if b["fullname"] in seen:
                raise MergeError(f"{name}: benchmark {b['fullname'][:120]!r} is also in {seen[b['fullname']]}")
            seen[b["fullname"]] = name
            benchmarks.append(b)
        if mi.get("busy_warning"):
            warnings.append(f"{name}: {mi['busy_warning']}")
        loads.append({"file": name, **{k: mi.get(k) for k in ("load_avg_start", "load_avg_end", "busy_warning")}})
    info.update(load_avg_start=loads[0]["load_avg_start"], load_avg_end=loads[-1]["load_avg_end"],
                busy_warning="; ".join(warnings) or None, parts=loads)
    merged.update(machine_info=info, benchmarks=benchmarks)
    return merged


def merge_files(out: Path, part_files: list[Path]) -> dict:
    """`merge` the part JSONs (named by their file stem) into `out`, written aside and renamed so
    that a failed merge leaves no half-written result."""
    parts = [(p.stem, json.loads(p.read_text())) for p in part_files]
    merged = merge(parts)
    tmp = out.with_name(out.name + ".partial")
    tmp.write_text(json.dumps(merged, indent=4))
    tmp.replace(out)
    return merged


def summary(merged: dict) -> list[str]:
    """The merged run's ratio / memory lines and its busy-machine warning."""
    sys.path.insert(0, str(BENCH))
    from benchutil import summary_lines

    lines = summary_lines([(b["name"], b.get("extra_info", {})) for b in merged["benchmarks"]])
    warning = merged.get("machine_info", {}).get("busy_warning")
    return lines + ([f"WARNING {warning}"] if warning else [])


def run(out: Path, k: str | None = None, files: list[Path] | None = None) -> int:
    """One ``pytest --benchmark-only`` per benchmark file, then `merge_files` into `out`."""
    failed = []
    with tempfile.TemporaryDirectory(prefix="sam-fast-bench-") as tmp:
        written = []
        for n, path in enumerate(files or bench_files()):
            part = Path(tmp) / f"{n:02d}-{path.stem}.json"
            cmd = [sys.executable, "-m", "pytest", "-q", str(path), "--benchmark-only",
                   "--benchmark-columns=median,iqr,rounds", f"--benchmark-json={part}"] + (["-k", k] if k else [])
            print(" ".join(cmd), flush=True)
            rc = subprocess.call(cmd, cwd=ROOT)
            if rc not in (0, NO_TESTS):
                failed.append(f"{path.relative_to(ROOT)} (exit {rc})")
            if part.exists():  # none when every benchmark of the file was skipped or deselected
                written.append(part)
        out.parent.mkdir(parents=True, exist_ok=True)
        merged = merge_files(out, written)
    print("\n".join(["", "merged ratios (x: times faster / larger, measured side by side), throughput and memory:",
                     *summary(merged), f"results: {out}"]))
    if failed:
        print(f"bench/run.py: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True, help="merged benchmark JSON to write")
    ap.add_argument("-k", help="pytest -k expression selecting benchmarks")
    ap.add_argument("--merge", nargs="+", metavar="PART", help="only merge these part JSONs into --json")
    args = ap.parse_args(argv)
    out = Path(args.json)
    if args.merge:
        try:
            merged = merge_files(out, [Path(p) for p in args.merge])
        except MergeError as e:
            print(f"bench/run.py: {e}", file=sys.stderr)
            return 1
        print("\n".join([*summary(merged), f"results: {out}"]))
        return 0
    try:
        return run(out, args.k)
    except MergeError as e:
        print(f"bench/run.py: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
