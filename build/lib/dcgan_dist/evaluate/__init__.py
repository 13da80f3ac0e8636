"""Evaluation, `python -m dcgan_dist.evaluate`: the paper's latent walks and arithmetic (latent), the
discriminator-features SVM (features), mode coverage with a real-label classifier (classifier), FID and KID (fid),
and the same scores during training (during_training). cli parses, commands runs each command.

Imports data/, distributed.context, checkpoint.py, models.py and the foundations; never train/ or shard/.
"""
