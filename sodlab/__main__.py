"""``python -m sodlab ...`` and ``torchrun -m sodlab train ...``: the command line, as an entry
that sits above every module (``sodlab.train`` imports nothing of the command line)."""
import sys

from sodlab.cli import main

status = main()
try:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
except ImportError:
    pass
sys.exit(status)
