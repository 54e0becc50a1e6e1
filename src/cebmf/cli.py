"""The ``cebmf`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

logger = logging.getLogger("cebmf")


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    summary = run_demo(Path(args.out), group=args.group)
    print(summary)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cebmf",
        description="Covariate-moderated Empirical Bayes Matrix Factorization.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="run the demo on scanpy's bundled pbmc68k_reduced data",
        description=(
            "Adaptive shrinkage of per-gene differential-expression estimates (one cell type "
            "against the rest) on the integer counts of scanpy's pbmc68k_reduced, with every "
            "prior family; writes a CSV table and a PNG figure to --out."
        ),
    )
    demo.add_argument("--out", default="cebmf-demo", help="output folder (default: cebmf-demo)")
    demo.add_argument(
        "--group",
        default="CD14+ Monocyte",
        help="cell type (obs['bulk_labels']) tested against the rest (default: CD14+ Monocyte)",
    )
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
