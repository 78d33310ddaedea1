"""One process of a two-process ``resflow train`` whose rank ``KILL_RANK`` (default 1)
is killed (SIGKILL) at its second step, as a crashed or preempted process would be: the
other rank must end with one line, not the collective's traceback. Launched by
``test_distributed.py`` with the environment torchrun sets (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT)."""

from __future__ import annotations

import os
import signal
import sys

from resflow.cli import main
from resflow.training import Trainer

if __name__ == "__main__":
    if os.environ["RANK"] == os.environ.get("KILL_RANK", "1"):
        step = Trainer._forward_backward
        calls = [0]

        def dying(self, idx):  # type: ignore[no-untyped-def]
            calls[0] += 1
            if calls[0] == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return step(self, idx)

        Trainer._forward_backward = dying  # type: ignore[method-assign]
    sys.exit(main(sys.argv[1:]))
