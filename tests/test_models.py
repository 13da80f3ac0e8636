"""The paper's architecture rules, checked on the built modules, and the standard parameter counts."""

from pathlib import Path

import pytest
import torch
from torch import nn

from dcgan_dist import config, models


def _cfg(**kw):
    return config.load(None, [f"model.{k}={v}" for k, v in kw.items()]).model


def test_standard_64px_parameter_counts():
    g, d = models.build(_cfg(resolution=64, channels=3, nz=100, ngf=64, ndf=64, kernel=4))
    assert models.num_params(g) == 3_576_704
    assert models.num_params(d) == 2_765_568


@pytest.mark.parametrize("resolution", [32, 64, 128])
@pytest.mark.parametrize("kernel", [4, 5])
def test_shapes_and_layer_count(resolution, kernel):
    m = _cfg(resolution=resolution, channels=3, ngf=8, ndf=8, kernel=kernel)
    g, d = models.build(m)
    z = models.sample_z(3, m)
    x = g(z)
    assert x.shape == (3, 3, resolution, resolution)
    assert x.min() >= -1 and x.max() <= 1
    assert d(x).shape == (3,)
    ups = [l for l in g.modules() if isinstance(l, nn.ConvTranspose2d)]
    downs = [l for l in d.modules() if isinstance(l, nn.Conv2d)]
    n = {32: 3, 64: 4, 128: 5}[resolution]
    assert len(ups) == n + 1 and len(downs) == n + 1  # projection/readout plus log2(res/4) strided layers
    assert all(l.kernel_size == (kernel, kernel) for l in ups[1:] + downs[:-1])
    assert all(l.stride == (2, 2) for l in ups[1:] + downs[:-1])


def test_architecture_rules():
    g, d = models.build(_cfg(resolution=64))
    for net in (g, d):
        kinds = {type(m) for m in net.modules()}
        assert not kinds & {nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Linear}, "no pooling, no FC"
        assert all(getattr(m, "bias", None) is None for m in net.modules() if isinstance(m, (nn.Conv2d,
                                                                                             nn.ConvTranspose2d)))
    gl, dl = list(g.main), list(d.main)
    # G: BN + ReLU after every layer but the last, which is followed by Tanh and no BN.
    assert isinstance(gl[-1], nn.Tanh) and isinstance(gl[-2], nn.ConvTranspose2d)
    assert all(isinstance(m, nn.ReLU) for m in gl if isinstance(m, (nn.ReLU, nn.LeakyReLU, nn.Tanh)) and m is not gl[-1])
    assert sum(isinstance(m, nn.BatchNorm2d) for m in gl) == 4
    # D: no BN right after the input convolution; LeakyReLU(0.2) everywhere; BN on every other hidden layer.
    assert isinstance(dl[0], nn.Conv2d) and isinstance(dl[1], nn.LeakyReLU)
    assert all(m.negative_slope == 0.2 for m in dl if isinstance(m, nn.LeakyReLU))
    assert not any(isinstance(m, nn.ReLU) for m in dl)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in dl) == 3
    assert isinstance(dl[-1], nn.Conv2d) and dl[-1].out_channels == 1


def test_paper_initialisation():
    torch.manual_seed(0)
    g, d = models.build(_cfg(resolution=64))
    convs = [m.weight for net in (g, d) for m in net.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    w = torch.cat([c.flatten() for c in convs])
    assert abs(w.mean()) < 1e-3 and abs(w.std() - 0.02) < 1e-3
    bn = torch.cat([m.weight for net in (g, d) for m in net.modules() if isinstance(m, nn.BatchNorm2d)])
    assert abs(bn.mean() - 1) < 0.01 and abs(bn.std() - 0.02) < 0.01


def test_latent_priors():
    u = models.sample_z(10_000, _cfg(z_prior="uniform"))
    assert u.shape == (10_000, 100) and u.min() >= -1 and u.max() <= 1 and abs(u.std() - 0.577) < 0.01
    n = models.sample_z(10_000, _cfg(z_prior="normal"))
    assert abs(n.std() - 1) < 0.01


def test_perf_auto_resolves_to_the_fast_correct_path_per_device():
    from dcgan_dist.train.perf import resolve

    def p(*overrides):
        return config.load(None, list(overrides)).perf

    gpu = resolve(p(), "cuda")
    assert (gpu.amp, gpu.channels_last, gpu.fused_adam, gpu.cuda_graph, gpu.notes) == ("bf16", True, True, True, ())
    cpu = resolve(p(), "cpu")
    assert (cpu.amp, cpu.channels_last, cpu.fused_adam, cpu.cuda_graph) == ("fp32", False, False, False)
    assert "no native bf16" in cpu.describe()
    native = resolve(p(), "cpu", cpu_bf16="avx512_bf16")  # measured: faster, digit coverage kept (README)
    assert native.amp == "bf16" and "avx512_bf16" in native.describe()
    assert resolve(p("perf.amp=fp32"), "cpu", cpu_bf16="amx_bf16").amp == "fp32"  # explicit wins
    assert resolve(p("perf.amp=bf16"), "cpu").amp == "bf16"
    assert resolve(p(), "cuda", bf16_supported=False).amp == "fp32"
    fp16 = resolve(p("perf.amp=fp16"), "cuda")
    assert not fp16.cuda_graph and "scaler" in fp16.notes[0]
    compiled = resolve(p("perf.compile=reduce-overhead"), "cuda")
    assert not compiled.cuda_graph and "reduce-overhead" in compiled.notes[0]
    assert resolve(p("perf.compile=default"), "cuda").cuda_graph  # default compile mode makes no graphs itself
    compressed = resolve(p("perf.grad_compression=bf16"), "cuda")
    assert not compressed.cuda_graph and "grad_compression=bf16" in compressed.notes[0]
    assert compressed.grad_compression == "bf16" and "grad_compression bf16" in compressed.describe()
    assert resolve(p("perf.grad_compression=bf16", "perf.cuda_graph=true"), "cuda").cuda_graph  # explicit wins
    explicit = resolve(p("perf.channels_last=false", "perf.cuda_graph=false", "perf.fused_adam=false"), "cuda")
    assert (explicit.channels_last, explicit.cuda_graph, explicit.fused_adam) == (False, False, False)
    assert resolve(p("perf.channels_last=true", "perf.amp=bf16"), "cpu").channels_last  # explicit wins on the CPU
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve(p("perf.cuda_graph=true"), "cpu")
    with pytest.raises(ValueError, match="not fp16"):
        resolve(p("perf.cuda_graph=true", "perf.amp=fp16"), "cuda")
    with pytest.raises(config.ConfigError, match="perf.cuda_graph"):
        config.load(None, ["perf.cuda_graph=maybe"])


def test_cpu_bf16_units_are_read_from_the_cpu_flags():
    from dcgan_dist.train.perf import cpu_bf16_units

    xeon = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\nprocessor\t: 1\n"
    assert cpu_bf16_units(xeon) == "avx512_bf16"
    assert cpu_bf16_units("flags\t: avx512f amx_tile amx_bf16 avx512_bf16\n") == "amx_bf16"
    assert cpu_bf16_units("Features\t: fp asimd sve bf16 i8mm\n") == "bf16"  # Arm (Graviton 3)
    assert cpu_bf16_units("flags\t: fpu sse2 avx avx2 avx512f avx512bw\n") is None  # AVX-512 without bf16
    assert cpu_bf16_units("") is None
    if Path("/proc/cpuinfo").exists():  # with no argument it reads this machine's flags
        assert cpu_bf16_units() == cpu_bf16_units(Path("/proc/cpuinfo").read_text())


def test_shipped_gpu_configs_need_no_perf_flags():
    from dcgan_dist.train.perf import resolve

    for name in ("lsun_bedroom_64", "faces_64"):
        r = resolve(config.load(config.find(name)).perf, "cuda")
        assert (r.amp, r.channels_last, r.fused_adam, r.cuda_graph) == ("bf16", True, True, True), name


def test_cpu_floor_benchmark_as_the_readme_gives_it():
    """`python benchmarks/cpu_floor.py`: one real step's arithmetic (FlopCounterMode, exact for the default
    model), our step's rate and the CPU's matrix-multiply speed, and the floor they give the default run."""
    import re
    import subprocess

    from doc_commands import documented

    repo = Path(__file__).resolve().parent.parent
    r = subprocess.run(documented("python benchmarks/cpu_floor.py"), cwd=repo, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    row = next(line for line in r.stdout.splitlines() if line.startswith("| fp32 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "0.376"  # GFLOP an image: G and D at 32x32x1, widths 64, forward and backward
    step_ips, floor = float(cells[2]), float(cells[6].removesuffix(" s"))
    assert step_ips > 0 and 0 < floor <= 150000 / step_ips  # our step cannot beat the multiply's speed
    assert re.search(r"floor of the default run on this CPU \((fp32|bf16)\): \d+ s$", r.stdout.strip())
