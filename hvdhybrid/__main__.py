"""``python -m hvdhybrid`` is ``hvdtrain``."""

from .cli.main import main

main()
