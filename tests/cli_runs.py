"""Several `cli.py` runs in one process, one after another: `python tests/cli_runs.py RUNS.json`, RUNS.json a list of
argument lists. Under a DDP trainer every rank runs this script (Lightning's launcher starts the other ranks with the
same command line), so the ranks pay Python's and PyTorch's start-up once and then form a process group per run (the
CLI's `DestroyProcessGroup` ends each): the DDP parity tests run every loss in one launch."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as cli.py: before torch loads OpenMP

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from madpo.cli import cli_main  # noqa: E402


def main(path: str) -> None:
    for args in json.loads(Path(path).read_text()):
        cli_main(args)


if __name__ == "__main__":
    main(sys.argv[1])
