"""``python -m kava.lmeval ARGS``: lm-eval's own command line, with the ``kava`` model
registered (``--model kava`` is added when no ``--model`` is given)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    import lm_eval.__main__

    import kava.lmeval.model  # noqa: F401  (registers the model "kava")

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in ("run", "ls", "validate"):
        args = ["run", *args]
    if args[0] == "run" and not any(a == "--model" or a.startswith("--model=") for a in args):
        args = ["run", "--model", "kava", *args[1:]]
    saved, sys.argv = sys.argv, ["lm-eval", *args]  # lm-eval parses sys.argv itself
    try:
        lm_eval.__main__.cli_evaluate()
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()
