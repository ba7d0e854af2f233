"""The argument parser of the ``lofit-*`` commands: argparse, but a bad flag ends like every other bad setting.

argparse's own ``error`` prints the whole usage block above the message; these commands promise one line on
stderr and exit status 2 for any bad input, so that a script or a log shows the reason and nothing else."""

from __future__ import annotations

import argparse


class OneLineParser(argparse.ArgumentParser):
    """:class:`argparse.ArgumentParser` whose errors are one line, ``PROG: error: MESSAGE (see PROG --help)``, with
    exit status 2 (argparse's). Sub-command parsers made by ``add_subparsers`` are of this class too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
