"""Everything that knows about ranks: the process group and device (context), batchnorm synchronised across
ranks (syncbn), and launching the training loop on a Ray cluster (ray_launch, which is handed the loop and
imports nothing of train/).

Imports data/ (storage: where paths point), checkpoint.py and the foundations below it.
"""
