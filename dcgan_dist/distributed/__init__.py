"""Everything that knows about ranks: the process group and device (context), forming it in bounded time and
saying where each rank runs (rendezvous), batchnorm synchronised across ranks (syncbn), node preemption notices
(preemption), and launching the training loop on a Ray cluster (ray_launch, which is handed the loop and imports
nothing of train/).

Imports data/ (storage: where paths point), checkpoint.py and the foundations below it.
"""
