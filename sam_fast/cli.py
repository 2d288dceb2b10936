"""The ``sam-fast`` command line.

    sam-fast env                                 versions, devices, compiled extension, op backends
    sam-fast demo [--steps N] [--batch B] [--seed S]   the tiny SAM end to end on a CPU
"""

from __future__ import annotations

import argparse
import sys


def _cmd_env(args: argparse.Namespace) -> int:
    from sam_fast import env

    print(env.report())
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from sam_fast import demo

    kwargs = {k: getattr(args, k) for k in ("steps", "batch", "seed") if getattr(args, k) is not None}
    demo.main(**kwargs)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sam-fast",
        description="sam_fast: a fast SAM (InstructBLIP + W-former guidance). "
        "Run `sam-fast COMMAND --help` for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "env",
        help="print versions, devices, the compiled extension and each op's backend",
        description="Print Python/torch/transformers/triton versions, CUDA devices, whether the "
        "compiled extension sam_fast._C loaded (and why not), and for each op the backend the "
        "dispatcher picks and why the others were refused. Same as `python -m sam_fast.env`.",
    )
    p.set_defaults(func=_cmd_env)

    p = sub.add_parser(
        "demo",
        help="train and run a tiny random SAM end to end on a CPU (no downloads)",
        description="Build the tiny SAM with random frozen weights, train its trainable modules on a "
        "synthetic multi-image task, generate, and print the env report (sam_fast.demo). "
        "Options left out keep the demo's defaults.",
    )
    p.add_argument("--steps", type=int, help="training steps (demo default: 200)")
    p.add_argument("--batch", type=int, help="samples per training batch (demo default: 8)")
    p.add_argument("--seed", type=int, help="random seed (demo default: 0)")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
