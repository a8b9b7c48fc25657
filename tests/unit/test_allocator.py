"""hvdhybrid.allocator: hvdtrain starts again under jemalloc where it is installed; the choice is checked."""

import json
import os
import subprocess
import sys

import pytest

from hvdhybrid import allocator

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROBE = ("import sys, json, hvdhybrid.allocator as a; a.reexec(); "
         "print(json.dumps([a.running(), open('/proc/self/maps').read().count('jemalloc') > 0]))")


def _probe(**env: str) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF", allocator.ENV)}
    e.pop("_HVDHYBRID_ALLOCATOR_SET", None)
    e.update(env, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=e, timeout=60)


def test_choice_reads_the_environment_and_refuses_other_values():
    assert allocator.choice({}) == "jemalloc"
    assert allocator.choice({allocator.ENV: "System"}) == "system"
    with pytest.raises(allocator.AllocatorError, match="choose jemalloc or system"):
        allocator.choice({allocator.ENV: "tcmalloc"})


def test_preload_env_puts_the_library_first_and_keeps_the_users_conf():
    env = allocator.preload_env({"LD_PRELOAD": "/x/libother.so"}, "/lib/libjemalloc.so.2")
    assert env["LD_PRELOAD"] == "/lib/libjemalloc.so.2:/x/libother.so"
    assert env["MALLOC_CONF"] == allocator.CONF
    assert allocator.preload_env({"MALLOC_CONF": "narenas:1"}, "/l")["MALLOC_CONF"] == "narenas:1"


@pytest.mark.skipif(allocator.library() is None, reason="needs libjemalloc2 (bin/setup installs it)")
def test_the_process_starts_again_under_jemalloc_and_maps_it():
    got = _probe()
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout) == ["jemalloc", True]


def test_system_keeps_the_c_library_and_a_bad_value_exits_2():
    got = _probe(**{allocator.ENV: "system"})
    assert json.loads(got.stdout) == ["system", False]
    bad = _probe(**{allocator.ENV: "tcmalloc"})
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "choose jemalloc or system" in bad.stderr
