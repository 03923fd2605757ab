"""Tensor parallelism on torch.distributed: process groups, this process's rank, collectives.

With no process group (tensor_parallel_size=1) every query answers "rank 0 of 1" and every
collective returns its input untouched, so the single-process path pays nothing.
"""
