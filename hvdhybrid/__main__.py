"""``python -m hvdhybrid`` is ``hvdtrain``."""

from .cli import main

main()
