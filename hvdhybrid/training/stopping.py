"""Stopping on request: a signal sets a flag; every rank stops after the same step."""

from __future__ import annotations

from typing import Any, Optional

__all__ = ["Stopped", "StopSignals"]


class Stopped(Exception):
    """Training stopped by a signal after writing a checkpoint (``path``, if any)."""

    def __init__(self, signum: int, step: int, path: Optional[str]) -> None:
        super().__init__(f"stopped by signal at step {step}"
                         + (f"; checkpoint in {path}" if path else ""))
        self.signum, self.step, self.path = signum, step, path


class StopSignals:
    """While training: SIGTERM, SIGINT and SIGUSR1 set a flag, acted on at the next step boundary.

    SIGUSR1 is what `hvdtrain launch` sends: mpirun forwards it to every rank and
    keeps forwarding their output, whereas SIGTERM/SIGINT put mpirun itself into
    abort mode (it stops reading the ranks' output and kills them a second later).
    """

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.old: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
                self.old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.trainer.stop_signal > 0:  # a second signal: stop now
            raise KeyboardInterrupt(f"signal {signum} received twice")
        self.trainer.stop_signal = signum
        self.trainer.p2p.stop_requested = True

    def __exit__(self, *exc: Any) -> None:
        import signal

        for sig, h in self.old.items():
            signal.signal(sig, h)
