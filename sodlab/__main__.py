"""``python -m sodlab ...`` and ``torchrun -m sodlab train ...``: the command line, as an entry
that sits above every module (``sodlab.train`` imports nothing of the command line)."""
import sys

from sodlab.cli import main

status = main()
# Only a command that imported torch can have started a process group; importing torch here for
# the check would add seconds to every other command.
if "torch.distributed" in sys.modules:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
sys.exit(status)
