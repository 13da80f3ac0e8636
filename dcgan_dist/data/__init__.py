"""The read path: which shards data.shards names (shardset, manifest), where they live (storage), how a tar is
parsed (tarread), how an image decodes (images), the deterministic, resumable batch stream (stream) and its
process's allocator settings (heap).

Imports config.py, pixels.py and files below it; never train/, shard/ or evaluate/. Importing data.images,
data.manifest or data.storage does not import torch, so the shard tool's workers start fast.
"""
