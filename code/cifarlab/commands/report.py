"""`python -m cifarlab report`: rebuild report/README.md and report/img/ from run directories."""
from __future__ import annotations

NAME = "report"
HELP = "build report/README.md (tables per experiment group, study sections, figures) from log/"


def add_arguments(parser) -> None:
    parser.add_argument("--log", default=None, metavar="DIR",
                        help="root of the run directories (default: <project root>/log)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="where README.md and img/ go (default: <project root>/report)")


def run(args) -> int:
    from cifarlab.report.build import build_report

    from cifarlab.paths import log_dir, report_dir

    readme = build_report(args.log or log_dir(), args.out or report_dir())
    print(f"report written: {readme}")
    return 0
