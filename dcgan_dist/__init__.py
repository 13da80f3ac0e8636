"""dcgan-dist: distributed DCGAN training.

The package is laid out in layers; a module imports only from layers below its own (tests/test_layout.py checks
this, and that there is no import cycle):

  7  command lines    sample.py, train/cli.py, shard/cli.py, evaluate/cli.py (and their __main__.py)
  6  train/           the training loop, the GAN step, speed options, TensorBoard
  5  shard/           the sharding tool (the write path)
     evaluate/        the paper's experiments and sample-quality metrics, also during training
  4  distributed/     ranks and process groups, start-up, synchronised batchnorm, preemption, the Ray launcher
  3  data/            the read path: shard sets, manifests, storage, tar parsing, image decoding, the stream
  2  checkpoint.py    atomic checkpoints and the networks they hold
  1  models.py, grids.py   G and D as the paper specifies them; image grids
  0  config.py, files.py, pixels.py   the schema, atomic files, the uint8 <-> [-1, 1] conversion
 -1  limits.py        what reading others' files may cost: the defaults config.py, data/ and shard/ share

Within a part (a subpackage) modules may import each other, without cycles.
"""

__version__ = "0.1.0"
