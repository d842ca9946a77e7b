"""`python -m cifarlab report`: rebuild report/README.md and report/img/ from run directories."""
from __future__ import annotations

NAME = "report"
HELP = "build report/README.md (tables per experiment group, study sections, figures) from log/"


def add_arguments(parser) -> None:
    parser.add_argument("--log", default="log", metavar="DIR", help="root of the run directories (default: log)")
    parser.add_argument("--out", default="report", metavar="DIR", help="where README.md and img/ go (default: report)")


def run(args) -> int:
    from cifarlab.report.build import build_report

    readme = build_report(args.log, args.out)
    print(f"report written: {readme}")
    return 0
