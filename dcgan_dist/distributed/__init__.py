"""Everything that knows about ranks: the process group and device (context), forming it in bounded time and
saying where each rank runs (rendezvous), batchnorm synchronised across ranks (syncbn), the one path by which a run
stops early and what follows each way (interruptions), the hang watchdog on every rank (watchdog), launching the
training loop on a Ray cluster (ray_launch, which is handed the loop and imports nothing of train/), a worker
node's Ray following its head's (follow_head, with processes: /proc and signals, and ray_files: where Ray keeps its
files), and every use of Ray's and torch's private parts, checked at start-up (private_api).

Imports data/ (storage: where paths point), checkpoint.py and the foundations below it.
"""
