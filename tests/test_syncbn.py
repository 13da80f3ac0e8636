"""AllReduceBatchNorm on 2 gloo ranks equals plain BatchNorm on the concatenated batch; convert() covers G and D."""

from __future__ import annotations

import torch
from torch import nn

from dcgan_dist import models
from dcgan_dist.distributed import syncbn
from helpers import assert_same_tensors
from multirank import run_ranks

C, PER_RANK = 6, 4


def _inputs(offset: float = 0.0):
    """Two training iterations of a global batch of 8, loss weights, and a BatchNorm with non-trivial affine."""
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(2 * PER_RANK, C, 5, 5, generator=gen) * 3 + offset for _ in range(2)]
    ws = [torch.randn(2 * PER_RANK, C, 5, 5, generator=gen) for _ in range(2)]
    bn = nn.BatchNorm2d(C)
    with torch.no_grad():
        bn.weight.normal_(1.0, 0.3, generator=gen)
        bn.bias.normal_(0.0, 0.3, generator=gen)
    return xs, ws, bn.state_dict()


def _run(bn: nn.Module, xs, ws, rows: slice) -> dict:
    """Two training forward/backward passes over rows of each batch, then one eval forward."""
    out = {"y": [], "dx": []}
    for x, w in zip(xs, ws):
        x = x[rows].clone().requires_grad_()
        y = bn(x)
        (y * w[rows]).sum().div(len(w)).backward()  # this rank's share of a mean over the global batch
        out["y"].append(y.detach())
        out["dx"].append(x.grad)
    bn.eval()
    out["y_eval"] = bn(xs[0][rows])
    out.update(dweight=bn.weight.grad, dbias=bn.bias.grad, state=bn.state_dict())
    return out


def _rank(rank: int, world_size: int, offset: float) -> dict:
    xs, ws, state = _inputs(offset)
    bn = syncbn.convert(nn.Sequential(nn.BatchNorm2d(C)))[0]
    assert isinstance(bn, syncbn.AllReduceBatchNorm)
    bn.load_state_dict(state)
    return _run(bn, xs, ws, slice(rank * PER_RANK, (rank + 1) * PER_RANK))


def _max_diffs(ranks: list[dict], ref: dict) -> dict:
    diffs = {
        "output": max((torch.cat([r["y"][i] for r in ranks]) - ref["y"][i]).abs().max() for i in range(2)),
        "input grad": max((torch.cat([r["dx"][i] for r in ranks]) - ref["dx"][i]).abs().max() for i in range(2)),
        "eval output": (torch.cat([r["y_eval"] for r in ranks]) - ref["y_eval"]).abs().max(),
        # Each rank holds its share of the parameter gradients; DDP would average them, here they are summed.
        "weight grad": (sum(r["dweight"] for r in ranks) - ref["dweight"]).abs().max(),
        "bias grad": (sum(r["dbias"] for r in ranks) - ref["dbias"]).abs().max(),
    }
    for rank, r in enumerate(ranks):
        for key in ("running_mean", "running_var"):
            diffs[f"rank {rank} {key}"] = (r["state"][key] - ref["state"][key]).abs().max()
        assert r["state"]["num_batches_tracked"] == ref["state"]["num_batches_tracked"] == 2
    return {k: float(v.detach()) for k, v in diffs.items()}


def test_two_ranks_equal_batchnorm_on_the_concatenated_batch():
    ranks = run_ranks(_rank, 2, 0.0)
    xs, ws, state = _inputs()
    bn = nn.BatchNorm2d(C)
    bn.load_state_dict(state)
    diffs = _max_diffs(ranks, _run(bn, xs, ws, slice(None)))
    assert max(diffs.values()) <= 1e-6, diffs


def _bf16_rank(rank: int, world_size: int) -> dict:
    xs, ws, state = _inputs()
    bn = syncbn.convert(nn.Sequential(nn.BatchNorm2d(C)))[0]
    bn.load_state_dict(state)
    return _run(bn, [x.bfloat16() for x in xs], ws, slice(rank * PER_RANK, (rank + 1) * PER_RANK))


def test_bf16_inputs_normalise_in_float32_and_come_back_in_bf16():
    """What bf16 autocast on the CPU hands the batchnorm (perf.amp=bf16, or auto on CPUs with native bf16): the
    same as plain BatchNorm on the concatenated batch, output and input gradient in bf16, buffers in float32."""
    ranks = run_ranks(_bf16_rank, 2)
    xs, ws, state = _inputs()
    bn = nn.BatchNorm2d(C)
    bn.load_state_dict(state)
    ref = _run(bn, [x.bfloat16() for x in xs], ws, slice(None))
    for r in ranks:
        assert r["y"][0].dtype == r["dx"][0].dtype == r["y_eval"].dtype == torch.bfloat16
        assert r["state"]["running_mean"].dtype == torch.float32
    diffs = _max_diffs(ranks, ref)
    # Buffers and parameter gradients in float32; outputs and input gradients within bf16's rounding (8 bits).
    assert max(v for k, v in diffs.items() if "running" in k or "grad" in k and "input" not in k) <= 1e-5, diffs
    assert diffs["output"] <= 0.04 and diffs["eval output"] <= 0.04 and diffs["input grad"] <= 0.01, diffs


def test_large_mean_keeps_precision():
    """Inputs around 1000 (std 3): the merged moments stay as exact as the float64 answer allows in float32."""
    ranks = run_ranks(_rank, 2, 1000.0)
    xs, ws, state = _inputs(1000.0)
    bn = nn.BatchNorm2d(C).double()
    bn.load_state_dict(state)
    ref = _run(bn, [x.double() for x in xs], [w.double() for w in ws], slice(None))
    ref = {k: ({n: t.float() for n, t in v.items()} if isinstance(v, dict) else
               [t.float() for t in v] if isinstance(v, list) else v.float()) for k, v in ref.items()}
    diffs = _max_diffs(ranks, ref)
    # float32 holds 1000 + x to about 6e-5, so the normalised output can be no better than ~3e-5 here;
    # E[x^2] - E[x]^2 in float32 would miss the variance (9) by ~0.1 and the output by ~1e-2.
    assert diffs["output"] <= 1e-4 and diffs["rank 0 running_var"] <= 1e-3, diffs


def test_convert_replaces_every_batchnorm_and_keeps_state(tiny_cfg):
    torch.manual_seed(0)
    for plain in models.build(tiny_cfg.model):
        before = {k: v.clone() for k, v in plain.state_dict().items()}
        n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
        converted = syncbn.convert(plain)
        assert n_bn > 0
        assert sum(isinstance(m, syncbn.AllReduceBatchNorm) for m in converted.modules()) == n_bn
        assert not any(type(m) is nn.BatchNorm2d for m in converted.modules())
        assert_same_tensors(converted.state_dict(), before, type(plain).__name__)


def test_single_process_matches_batchnorm(tiny_cfg):
    """Without a process group the layer is plain batchnorm: a converted G gives the same images."""
    torch.manual_seed(0)
    g_plain, _ = models.build(tiny_cfg.model)
    torch.manual_seed(0)
    g_sync = syncbn.convert(models.build(tiny_cfg.model)[0])
    z = torch.randn(16, tiny_cfg.model.nz)
    assert torch.allclose(g_plain(z), g_sync(z), atol=1e-6)
