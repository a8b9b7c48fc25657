"""The hang report's pieces without MPI: the line, a frozen line, triggers and collecting lines."""

from __future__ import annotations

import os
import signal
import time

from hvdhybrid import waits


def test_the_line_names_the_action_and_the_wait_and_computing_otherwise() -> None:
    waits.set_action("1B3.2")
    with waits.waiting(lambda: "gradients of microbatch 3 from stage 2 to stage 1"):
        assert waits.line().endswith(": in 1B3.2, waiting for gradients of microbatch 3 "
                                     "from stage 2 to stage 1")
        with waits.waiting("the gradient sync"):
            assert waits.line().endswith("waiting for the gradient sync")
        assert "microbatch 3" in waits.line()  # the outer wait is back
    assert waits.line().endswith(": in 1B3.2, computing (not waiting)")
    waits.set_action(None)
    assert "between actions" in waits.line()


def test_a_report_never_fails_on_a_description_that_does() -> None:
    with waits.waiting(lambda: str(1 / 0)):
        assert "cannot say" in waits.line()


def test_a_reporter_answers_a_trigger_and_sigusr2_once_each(tmp_path, capsys) -> None:
    d = str(tmp_path / "hang")
    rep = waits.Reporter("rank 3 | bundle 1 | stage 1", 3, d).start()
    try:
        with waits.waiting("activations of microbatch 0"):
            waits.trigger(d)
            got = waits.collect(d, 1, timeout=5)
            assert len(got) == 1 and got[0].startswith("rank 3 | bundle 1 | stage 1 (host ")
            assert got[0].endswith("waiting for activations of microbatch 0")
            os.remove(os.path.join(d, "rank-00003.txt"))
            waits.trigger(d)  # within seconds of the last: the same report, not a new one
            time.sleep(4 * waits.POLL_S)
            assert not os.path.exists(os.path.join(d, "rank-00003.txt"))
            os.kill(os.getpid(), signal.SIGUSR2)
            assert len(waits.collect(d, 1, timeout=5)) == 1
    finally:
        rep.close()
    assert capsys.readouterr().err.count("[hang report] rank 3") == 2


def test_a_frozen_line_outlives_the_wait_it_describes() -> None:
    try:
        with waits.waiting("the peer"):
            waits.freeze()
        assert waits.line().endswith("waiting for the peer")
    finally:
        waits._NOW["frozen"] = None
