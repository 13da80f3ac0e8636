"""Everything that knows about ranks: the process group and device (context), forming it in bounded time and
saying where each rank runs (rendezvous), batchnorm synchronised across ranks (syncbn), stop requests and node
preemption notices as values (interruptions), launching the training loop on a Ray cluster (ray_launch, which is
handed the loop and imports nothing of train/), and a worker node's Ray following its head's (follow_head, with
processes: /proc and signals, and ray_files: where Ray keeps its files).

Imports data/ (storage: where paths point), checkpoint.py and the foundations below it.
"""
