"""The argument parser of vtprune's commands: a bad argument is one line on stderr and exit status 2."""

from __future__ import annotations

import argparse


class OneLineParser(argparse.ArgumentParser):
    """argparse, but an error prints ``prog: error: message (see prog --help)`` instead of the whole
    usage block, so a script's log shows what was wrong in the one line it keeps."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
