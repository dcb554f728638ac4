"""madpo's command line. `python cli.py fit -c configs/tiny/madpo.yaml`, `python cli.py pipeline -c ...`; see README."""

import os

# GNU OpenMP's threads spin while they wait; on a CPU shared with other processes that stalls every parallel op (a
# training step is several times slower on busy cores than with passive waiting, and no faster idle). It is
# read once, when torch loads OpenMP, so it has to be set before the first `import torch`.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from madpo.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
