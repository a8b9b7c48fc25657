"""``python -m hvdhybrid`` is ``hvdtrain``."""

from .allocator import reexec

reexec()  # under jemalloc where it is installed, before torch is imported (hvdhybrid.allocator)

from .cli.main import main  # noqa: E402

main()
