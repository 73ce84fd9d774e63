"""rag-report PATH [PATH...] [--out DIR]: report.html and report.md for runs and sweeps (no Hydra: paths in,
files out)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from rag_lightning.errors import friendly_errors

USAGE = """rag-report PATH [PATH...] [--out DIR | out=DIR] [--samples N] [--by FIELD]

PATH: a run directory (outputs/runs/train/<date>_<time>), a sweep directory (outputs/multiruns/train/<date>_<time>,
whose jobs are runs), or several. Writes report.html (self-contained, plots embedded) and report.md (with its
report_*.png) into DIR: by default the one PATH given, or the directory the PATHs share."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="rag-report", usage=USAGE, description=__doc__)
    parser.add_argument("paths", nargs="+", metavar="PATH", help="run or sweep directories")
    parser.add_argument("--out", help="directory for report.html and report.md")
    parser.add_argument("--samples", type=int, default=8, help="wrong answers shown (default 8)")
    parser.add_argument("--by", action="append", metavar="FIELD",
                        help="QA field to break down by (default: the category fields found, e.g. relation)")
    args_in = list(argv) if argv is not None else None
    if args_in is None:
        import sys

        args_in = sys.argv[1:]
    # Hydra-style `out=DIR` too, like the other rag-* commands
    args_in = [f"--out={a[4:]}" if a.startswith("out=") else a for a in args_in]
    return parser.parse_args(args_in)


def default_out(paths: list[str]) -> Path:
    if len(paths) == 1:
        return Path(paths[0])
    return Path(os.path.commonpath([str(Path(p).resolve()) for p in paths]))


@friendly_errors
def run(argv: list[str] | None = None) -> dict[str, Path]:
    from rag_lightning.report import build_report, write_report

    args = parse_args(argv)
    report = build_report(args.paths, samples=args.samples, fields=args.by)
    written = write_report(report, args.out or default_out(args.paths))
    best = report.best
    print(f"{len(report.runs)} run{'s' if len(report.runs) != 1 else ''}; objective {report.objective}"
          + (f"; best {best.name} ({best.metrics[report.objective]:.4f})" if best else ""))
    for note in report.notes:
        print(f"note: {note}")
    print(f"report: {written['html']}\n        {written['md']}")
    return written


def main() -> None:
    run()


if __name__ == "__main__":
    main()
