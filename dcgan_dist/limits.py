"""What a file from someone else (a shard, an archive, a photo folder) may cost to read: the defaults of
data.max_image_pixels / data.max_sample_bytes and of the shard tool's --max-image-pixels / --max-file-bytes.

Here, free of imports, so that the schema (config.py), the loader and the shard tool's workers share one value.
"""

# 8192 x 8192: above any camera's photo at its native size (a 61-megapixel sensor gives 9504 x 6336), far below
# a decompression bomb (a 30,000 x 30,000 JPEG of a few KiB decodes to 2.7 GB). An image at the limit decodes
# to 192 MiB of RGB, which every loader worker of every rank may hold at once.
MAX_IMAGE_PIXELS = 1 << 26
# 256 MiB: room for the largest image MAX_IMAGE_PIXELS allows, stored as raw RGB pixels (192 MiB).
MAX_SAMPLE_BYTES = 1 << 28
