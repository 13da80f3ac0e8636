"""The sharding tool, `python -m dcgan_dist.shard`: sources (LSUN LMDB, folders, archives, built-in sets) into
WebDataset tar shards with a manifest. cli parses, run drives one resumable run, worker decodes and encodes in
a process pool, output writes to a folder or a bucket through the one shard writer (writer); dedup and faces are
the paper's near-duplicate removal and face crops.

Imports data/ (image operations, the manifest format, storage) and the foundations; never train/ or evaluate/.
"""
