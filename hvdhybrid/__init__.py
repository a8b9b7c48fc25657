"""hvdhybrid: hybrid-parallel training on MPI and Horovod."""
