"""The Open MPI settings hvdhybrid gives itself (hvdhybrid/mpi_env.py)."""

from __future__ import annotations

import os
import subprocess
import sys

from hvdhybrid.comm import mpi_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# what Open MPI puts in every rank's environment: the world size and the number of nodes used
ONE_HOST = {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_MCA_orte_num_nodes": "1"}
SHARED_HOSTS = {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_MCA_orte_num_nodes": "2"}
TWO_HOSTS = {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_MCA_orte_num_nodes": "2"}
RULES = ("OMPI_MCA_coll_tuned_use_dynamic_rules", "OMPI_MCA_coll_tuned_dynamic_rules_filename")


def test_rules_only_when_every_rank_has_a_host_of_its_own():
    for env in (ONE_HOST, SHARED_HOSTS, {}, {"OMPI_COMM_WORLD_SIZE": "1", "OMPI_MCA_orte_num_nodes": "1"}):
        assert not any(k in mpi_env.defaults(env) for k in RULES), env
    got = mpi_env.defaults(TWO_HOSTS)
    assert got[RULES[0]] == "1" and got[RULES[1]] == mpi_env.RULES_FILE
    assert mpi_env.rules_given(got) and not mpi_env.rules_given(mpi_env.defaults(SHARED_HOSTS))
    assert got["OMPI_MCA_mpi_yield_when_idle"] == "1" and got["THP_MEM_ALLOC_ENABLE"] == "1"


def test_a_users_setting_wins():
    env = dict(TWO_HOSTS, OMPI_MCA_mpi_yield_when_idle="0", OMPI_MCA_coll_tuned_allreduce_algorithm="4")
    added = mpi_env.apply(env)
    assert env["OMPI_MCA_mpi_yield_when_idle"] == "0"
    assert not any(k in env for k in RULES), "a forced algorithm must not be overridden by our rules"
    assert added == {"THP_MEM_ALLOC_ENABLE": "1"}
    assert mpi_env.apply(env) == {}  # idempotent


def test_rules_file_says_recursive_doubling_for_two_ranks_ring_for_more():
    # collectives, id (allreduce = 2), comm sizes, per size: size, rules, [bytes, algorithm, fan, segment]
    assert mpi_env.read_rules() == [1, 2, 2, 2, 1, 0, 3, 0, 0, 3, 1, 0, 4, 0, 0]


def test_import_applies_them_before_mpi_starts():
    code = "import os, hvdhybrid; print(os.environ.get('OMPI_MCA_coll_tuned_dynamic_rules_filename', ''))"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMPI_")}
    env.update(TWO_HOSTS, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == mpi_env.RULES_FILE
    env.update(SHARED_HOSTS)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
