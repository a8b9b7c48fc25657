"""The Open MPI settings hvdhybrid gives itself (hvdhybrid/mpi_env.py)."""

from __future__ import annotations

import os
import subprocess
import sys

from hvdhybrid import mpi_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ONE_HOST = {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}
TWO_HOSTS = {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
RULES = ("OMPI_MCA_coll_tuned_use_dynamic_rules", "OMPI_MCA_coll_tuned_dynamic_rules_filename")


def test_rules_only_when_the_job_spans_hosts():
    assert not any(k in mpi_env.defaults(ONE_HOST) for k in RULES)
    assert not any(k in mpi_env.defaults({}) for k in RULES)  # not launched by Open MPI
    got = mpi_env.defaults(TWO_HOSTS)
    assert got[RULES[0]] == "1" and got[RULES[1]] == mpi_env.RULES_FILE
    assert got["OMPI_MCA_mpi_yield_when_idle"] == "1" and got["THP_MEM_ALLOC_ENABLE"] == "1"


def test_a_users_setting_wins():
    env = dict(TWO_HOSTS, OMPI_MCA_mpi_yield_when_idle="0", OMPI_MCA_coll_tuned_allreduce_algorithm="4")
    added = mpi_env.apply(env)
    assert env["OMPI_MCA_mpi_yield_when_idle"] == "0"
    assert not any(k in env for k in RULES), "a forced algorithm must not be overridden by our rules"
    assert added == {"THP_MEM_ALLOC_ENABLE": "1"}
    assert mpi_env.apply(env) == {}  # idempotent


def test_rules_file_says_recursive_doubling_for_two_ranks():
    # collectives, id (allreduce = 2), comm sizes, size 2, rules, [bytes, algorithm, fan, segment]
    assert mpi_env.read_rules() == [1, 2, 1, 2, 1, 0, 3, 0, 0]


def test_import_applies_them_before_mpi_starts():
    code = "import os, hvdhybrid; print(os.environ.get('OMPI_MCA_coll_tuned_dynamic_rules_filename', ''))"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMPI_")}
    env.update(TWO_HOSTS, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == mpi_env.RULES_FILE
    env.update(ONE_HOST)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
