"""Real multi-rank tests: ``run_ranks(W, fn, *args)`` from ds_face.spawn (W fresh processes, gloo: CPU tensors).

One thread per rank: W ranks share CI's 2 cores, and oversubscription makes gloo tests crawl.
"""
from ds_face.spawn import RankFailed, free_port, run_ranks  # noqa: F401
