"""hvdhybrid: hybrid-parallel (pipeline x task x data) training on MPI and Horovod."""

import os as _os

# Large torch CPU allocations (activations that travel between stages) on transparent
# huge pages: Open MPI's single-copy transfers of such buffers run up to 1.5x faster
# here. Read by torch's allocator at its first large allocation; a user's value wins.
_os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"
