"""Compare a benchmark run with a stored baseline on the tracked ratios (not absolute times).

    python bench/compare.py NEW.json BASELINE.json [--tolerance 0.10]

Every ``speedup_*`` value in ``extra_info`` of a benchmark present in both files is compared;
the exit status is 1 when any of them dropped by more than the tolerance (default 10%). Ratios
measured in one run are comparable across machines of a kind in a way absolute times are not.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def ratios(data: dict) -> dict[tuple[str, str], float]:
    out = {}
    for b in data.get("benchmarks", []):
        for k, v in b.get("extra_info", {}).items():
            if k.startswith("speedup_") and isinstance(v, (int, float)):
                out[(b["fullname"], k)] = float(v)
    return out


def compare(new: dict, base: dict, tolerance: float = 0.10) -> tuple[list[str], list[str]]:
    """(report lines, failures)."""
    new_r, base_r = ratios(new), ratios(base)
    lines, failures = [], []
    for key in sorted(set(new_r) & set(base_r)):
        n, b = new_r[key], base_r[key]
        change = n / b - 1 if b else 0.0
        line = f"{key[0]} {key[1]}: {b:.3f} -> {n:.3f} ({change:+.1%})"
        lines.append(line)
        if n < b * (1 - tolerance):
            failures.append(line)
    for key in sorted(set(base_r) - set(new_r)):
        lines.append(f"{key[0]} {key[1]}: missing from the new run")
    return lines, failures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("new")
    ap.add_argument("baseline")
    ap.add_argument("--tolerance", type=float, default=0.10)
    args = ap.parse_args(argv)
    lines, failures = compare(json.loads(Path(args.new).read_text()), json.loads(Path(args.baseline).read_text()),
                              args.tolerance)
    print("\n".join(lines) if lines else "no tracked ratios in common")
    if failures:
        print(f"\n{len(failures)} tracked ratio(s) dropped by more than {args.tolerance:.0%}:")
        print("\n".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
