"""bench/reproduce.py's sweep, split by concern: `cells` (one evaluated policy, the records the reports need and
where they are stored), `plan` (which cells an invocation wants), `runner` (running the pending ones, in workers
or here), `report` / `margin_best` / `figures` (the markdown reports, written from stored records alone).

The package lives in bench/ beside the scripts and imports `cellstore` as a sibling, so bench/ must be on sys.path
(the scripts put it there before importing this package, whether run directly or loaded by a test).
"""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent
if str(BENCH) not in sys.path:  # `cellstore` is a sibling module of the scripts, not an installed one
    sys.path.insert(0, str(BENCH))
