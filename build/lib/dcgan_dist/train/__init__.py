"""Training, `python -m dcgan_dist.train`: cli prepares data and picks local or Ray, loop is the training loop,
nets builds G, D and their optimizers and wraps the step, step is one GAN step in two phases (and its CUDA
graph), perf holds the speed options, runlog what the user sees (TensorBoard, progress).

Imports everything below it; only cli imports the Ray launcher (distributed/ray_launch), and only cli imports
the shard tool (to write the built-in data set).
"""
