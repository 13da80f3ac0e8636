"""Throughput and model-FLOPs utilisation of the training step, the data pipeline and the whole trainer.

    python benchmarks/gpu_throughput.py [--models standard,standard_128,lsun_bedroom_64,faces_64] [--batch 128]
        [--workers 8] [--modes fp32,bf16,bf16-cl,bf16-cl-compile]

One run, one table per model: (a) the pytorch/examples dcgan loop (fp32, same model and batch) as the baseline;
(b) our step in each mode; (c) the data pipeline alone, from raw-pixel and from JPEG (q95) shards of real
photographs (crops of scikit-image's) at the model's resolution, with N loader workers; (d) the whole trainer end
to end in the best mode from each. MFU is model FLOPs (counted by PyTorch's FlopCounterMode on one step) times
images/sec over the chip's dense bf16 peak. On the CPU it runs a reduced version (32x32, fewer steps, no compile).
"""

from __future__ import annotations

import argparse
import io
import platform
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dcgan_dist import pixels
from dcgan_dist.data.images import encode
from dcgan_dist.data.shardset import resolve
from dcgan_dist.data.stream import make_loader
from dcgan_dist.shard import writer
from dcgan_dist.train import perf
from dcgan_dist.train.loop import train
from train_step import MODELS, baseline_step_fn, bench_config, model_overrides, our_step_fn, sync, time_steps

MODES = {  # name -> perf overrides
    "fp32": ["perf.amp=fp32"],
    "bf16": ["perf.amp=bf16"],
    "bf16-cl": ["perf.amp=bf16", "perf.channels_last=true"],
    "fp32-graph": ["perf.amp=fp32", "perf.cuda_graph=true"],
    "bf16-graph": ["perf.amp=bf16", "perf.cuda_graph=true"],
    "bf16-cl-graph": ["perf.amp=bf16", "perf.channels_last=true", "perf.cuda_graph=true"],
    "bf16-compile": ["perf.amp=bf16", "perf.compile=default"],
    "bf16-compile-graph": ["perf.amp=bf16", "perf.compile=default", "perf.cuda_graph=true"],
    "fp16-cl": ["perf.amp=fp16", "perf.channels_last=true"],
}


PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")


def photo_crops(n: int, resolution: int, names: tuple[str, ...] = PHOTOS) -> list[np.ndarray]:
    """n square crops of scikit-image's real colour photographs, resized to resolution x resolution (Lanczos)."""
    from skimage import data as skd

    photos = [getattr(skd, name)() for name in names]
    photos = [p for p in photos if p.ndim == 3]
    rng = np.random.default_rng(0)
    crops = []
    for i in range(n):
        p = photos[i % len(photos)]
        side = int(rng.integers(resolution, min(p.shape[:2]) + 1))
        y, x = rng.integers(0, p.shape[0] - side + 1), rng.integers(0, p.shape[1] - side + 1)
        img = Image.fromarray(p[y:y + side, x:x + side, :3]).resize((resolution, resolution), Image.LANCZOS)
        crops.append(np.asarray(img))
    return crops


def photo_shards(outdir: Path, n: int, resolution: int, per_shard: int = 1000, fmt: str = "jpg") -> Path:
    """n crops of scikit-image's real photographs at resolution x resolution, as shards + manifest: JPEG (q95,
    PIL's defaults) or raw pixels (fmt="raw")."""
    outdir.mkdir(parents=True, exist_ok=True)
    samples = []
    for i, crop in enumerate(photo_crops(n, resolution)):
        if fmt == "jpg":
            buf = io.BytesIO()
            Image.fromarray(crop).save(buf, format="JPEG", quality=95)
            data = buf.getvalue()
        else:
            data = encode(crop, fmt, 0)
        samples.append((f"photo-{i:06d}", {fmt: data}))
    infos = [writer.write_shard(outdir / writer.shard_name("photos", k // per_shard),
                                   samples[k:k + per_shard]) for k in range(0, n, per_shard)]
    writer.write_manifest(outdir, infos, source="skimage.data photographs",
                          options={} if fmt == "jpg" else {"format": fmt})
    return outdir


def data_pipeline_rate(cfg, shards_dir: Path, batches: int) -> float:
    """Images/sec of the loader alone (decode, shuffle, batch, pinned copy to the device)."""
    shards = resolve(str(shards_dir))
    device = torch.device(cfg.train.device if cfg.train.device != "auto" else "cpu")
    loader = iter(make_loader(shards, cfg, 0, 1, pin_memory=device.type == "cuda"))
    for _ in range(max(4, cfg.data.loader_workers * 2)):  # start-up and first fill of the shuffle buffers
        next(loader)
    t0 = time.perf_counter()
    for _ in range(batches):
        x = pixels.from_uint8(next(loader)[0], device)
    sync(device)
    del x
    return batches * cfg.train.batch_size / (time.perf_counter() - t0)


def shards_for(root: Path, fmt: str, n: int, resolution: int) -> Path:
    """photo_shards at resolution x resolution in one format, made once under root."""
    outdir = root / f"{fmt}{resolution}"
    return outdir if outdir.exists() else photo_shards(outdir, n, resolution, fmt=fmt)


def model_rows(model: str, args, device, modes, steps, peak, scratch: Path) -> tuple[list, float, int]:
    """One model's rows: (a) the examples loop, (b) our step per mode, (c) the loader per shard format, (d) the
    trainer end to end in the best mode per shard format; and its GFLOP per image and resolution."""
    cuda = device.type == "cuda"
    extra = model_overrides(model)
    if not cuda:  # the reduced CPU form: every model at 32 px
        extra = [o for o in extra if not o.startswith("model.resolution=")] + ["model.resolution=32"]
    base_cfg = bench_config(64, args.batch, device.type, "perf.amp=fp32", *extra)
    resolution = base_cfg.model.resolution

    flop_step = our_step_fn(base_cfg, device)
    flop_step(0)
    flops = perf.flops_per_image(lambda: flop_step(1), args.batch)

    def row(name, ips, note=""):
        mfu = f"{100 * flops * ips / peak:.1f}%" if peak else "n/a"
        return name, ips, mfu, note

    rows = []
    sec = time_steps(baseline_step_fn(base_cfg, device), device, 3, steps)
    rows.append(row("(a) pytorch/examples loop, fp32 (baseline)", args.batch / sec))
    best = (None, 0.0)
    for mode in modes:
        cfg = bench_config(64, args.batch, device.type, *extra, *MODES[mode])
        try:
            t0 = time.perf_counter()
            step = our_step_fn(cfg, device)
            warm = 15 if "compile" in mode or "graph" in mode else 3
            sec = time_steps(step, device, warm, steps)
            rows.append(row(f"(b) dcgan_dist step, {mode}", args.batch / sec,
                            f"set-up + warm-up {time.perf_counter() - t0 - 3 * steps * sec:.0f} s"))
            if args.batch / sec > best[1]:
                best = (mode, args.batch / sec)
        except Exception as err:  # one failing mode must not hide the others' numbers
            traceback.print_exc()
            rows.append((f"(b) dcgan_dist step, {mode}", float("nan"), "-", f"failed: {type(err).__name__}"))
        if cuda:
            torch.cuda.empty_cache()

    for fmt, label in (("raw", "raw pixels"), ("jpg", "JPEG q95")):
        shards_dir = shards_for(scratch, fmt, 8000 if cuda else 2000, resolution)
        data_cfg = bench_config(64, args.batch, device.type, *extra, f"data.loader_workers={args.workers}",
                                "data.shuffle_buffer=1000")
        ips = data_pipeline_rate(data_cfg, shards_dir, 200 if cuda else 20)
        rows.append((f"(c) data pipeline alone, {label}, {args.workers} loader workers", ips, "-",
                     f"{resolution}x{resolution}"))
        e2e_images = args.e2e_images or (args.batch * 400 if cuda else args.batch * 12)
        run_dir = scratch / f"run-{model}-{fmt}"
        e2e_cfg = bench_config(64, args.batch, device.type, *extra, *MODES[best[0] or "fp32"],
                               f"data.shards={shards_dir}", f"data.loader_workers={args.workers}",
                               "data.shuffle_buffer=1000", f"train.images={e2e_images}",
                               f"log.every_images={e2e_images // 2}", f"log.sample_every_images={e2e_images}",
                               f"log.checkpoint_every_images={e2e_images}", f"run_dir={run_dir}")
        metrics = train(e2e_cfg)
        rows.append(row(f"(d) end to end (train.py), {best[0]}, {label}, {args.workers} workers",
                        metrics["perf/images_per_sec"], "second half of the run"))
    return rows, flops, resolution


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="standard", help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--workers", type=int, default=8, help="loader workers for (c) and (d)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--modes", default=None, help=f"comma-separated, from {', '.join(MODES)}")
    parser.add_argument("--e2e-images", type=int, default=None)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    steps = args.steps or (50 if cuda else 4)
    modes = (args.modes or ("fp32,bf16,bf16-cl,fp32-graph,bf16-graph,bf16-cl-graph,bf16-compile,bf16-compile-graph"
                            if cuda else "fp32,bf16")).split(",")
    if cuda:
        torch.backends.cudnn.benchmark = True
    peak = perf.peak_flops(device)
    where = (torch.cuda.get_device_name(device) if cuda
             else f"{platform.machine()} CPU, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            rows, flops, resolution = model_rows(model, args, device, modes, steps, peak, Path(tmp))
            peak_mem = f"; peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if cuda else ""
            print(f"\n## {model}\n\ndevice: {where}; torch {torch.__version__}; {model} at {resolution}x{resolution}"
                  f"{' (reduced CPU form)' if not cuda else ''}, batch {args.batch}; {flops / 1e9:.2f} GFLOP per "
                  f"trained image (FlopCounterMode); peak "
                  f"{'%.0f TFLOP/s dense bf16' % (peak / 1e12) if peak else 'unknown'}; median of 3 x {steps} steps"
                  f"{peak_mem}\n")
            print("| what | images/sec | vs baseline | MFU | note |")
            print("| --- | --- | --- | --- | --- |")
            for name, ips, mfu, note in rows:
                print(f"| {name} | {ips:,.0f} | {ips / rows[0][1]:.2f}x | {mfu} | {note} |", flush=True)
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)


if __name__ == "__main__":
    main()
