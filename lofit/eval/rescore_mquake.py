"""``python -m lofit.eval.rescore_mquake REPORT.json ...``: both MQuAKE exact-match numbers of saved ``lofit-eval``
reports, recomputed from their predictions (:func:`lofit.tasks.mquake.rescore`). Exits 2 with a one-line error."""

from __future__ import annotations

import sys

from lofit.tasks.base import TaskError
from lofit.tasks.mquake import rescore


def main(argv: list[str] | None = None) -> int:
    """Print ``report, label, exact_match, stripped`` per model (percent); returns the exit status."""
    paths = sys.argv[1:] if argv is None else argv
    if not paths or paths[0] in ("-h", "--help"):
        print("usage: python -m lofit.eval.rescore_mquake MQUAKE_REPORT.json [...]", file=sys.stderr)
        return 0 if paths else 2
    for path in paths:
        try:
            rows = rescore(path)
        except TaskError as error:
            print(f"rescore_mquake: error: {error}", file=sys.stderr)
            return 2
        for label, strict, stripped in rows:
            print(f"{path}\t{label}\texact_match {100 * strict:.1f}\tstripped {100 * stripped:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
