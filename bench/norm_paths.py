"""GPU time of each distinct GroupNorm call of one UNet CFG step and one MoVQ decode, by path: the Triton norms' three
kernels, their one kernel (small groups), the path ``norms._plan`` picks, and PyTorch's ops as the eager models run
them (the norm, then the time modulation's addcmul or MoVQ's spatial modulation, then SiLU).

Collects the calls as ``unet_norms.py`` does (the official models on the meta device, channels_last, the norms
recorded instead of run), then on the GPU times each distinct call on random inputs of its shapes: 20 calls captured
in a CUDA graph and replayed, so that a figure is GPU time alone (the eager pipeline also pays each launch on the host:
``norm_host_time.py``). Per call it also gives max |Triton - PyTorch|. The totals weigh each call by how often a step
or a decode makes it: what the norms cost per UNet step and per decode on each path, and where the one-kernel path
should end (``norms._SMALL_GROUP``, ``norms._SMALL_TILE``).

    python bench/norm_paths.py                                 # on CUDA: 768x768, fp16; ~20 s on an H200
    TRITON_INTERPRET=1 python bench/norm_paths.py --size 64    # on the CPU: each path once per call, the
                                                               # differences only (Triton's interpreter, no timing)

Writes ``bench/results/norm_paths_<device>.json`` (``--out`` for another file). The models are the official configs
as ``bench_pipeline.py`` holds them. ``gpu_check.sh`` runs it before the benchmark.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pipeline import MOVQ, UNET  # noqa: E402

from kandinsky22 import fast  # noqa: E402
from kandinsky22.models import movq, norms  # noqa: E402
from kandinsky22.models.movq import VQModel  # noqa: E402
from kandinsky22.models.unet import UNet2DConditionModel  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class Call(NamedTuple):
    model: str
    shape: tuple[int, ...]  # (N, C, H, W)
    groups: int
    eps: float
    silu: bool
    modulated: bool  # the UNet's time modulation, (N, C, 1, 1)
    spatial: tuple[int, ...] | None  # MoVQ's scale and shift maps, (N, C, h, w)
    in_bias: bool = False  # the norm of x + the bias its convolution left out (a resnet's second norm, Triton path)


def collect(size: int, dtype: torch.dtype) -> collections.Counter:
    """The norm calls of one UNet CFG step (batch 2) and one MoVQ decode (one latent) at ``size``, counted."""
    calls: collections.Counter = collections.Counter()
    model = ["unet"]

    def record(x, groups, weight, bias, eps, scale_1=None, shift=None, silu=False, spatial=None, in_bias=None):  # noqa: ANN001, ANN202
        spatial_shape = None if spatial is None else tuple(spatial[0].shape)
        modulated, folded = scale_1 is not None, in_bias is not None
        calls[Call(model[0], tuple(x.shape), groups, eps, silu, modulated, spatial_shape, folded)] += 1
        return torch.empty_like(x, memory_format=torch.channels_last)

    latent = size // 8
    with torch.device("meta"):
        unet = UNet2DConditionModel(**UNET).to(dtype)
        decoder = VQModel(**MOVQ).to(dtype)
    last = torch.channels_last
    patches = {
        (norms, "group_norm_nhwc"): record,
        (movq, "group_norm_nhwc"): record,
        (norms, "_triton_applies"): lambda norm, x: True,  # meta tensors: every norm takes the Triton path
    }
    with patched(patches), torch.no_grad():
        for module in (unet, decoder):
            module.to(memory_format=last)
            norms.use_triton_norms(module)
        sample = torch.empty(2, unet.config["in_channels"], latent, latent, device="meta", dtype=dtype)
        cond = {"image_embeds": torch.empty(2, unet.config["encoder_hid_dim"], device="meta", dtype=dtype)}
        unet(sample.contiguous(memory_format=last), torch.tensor(500, device="meta"), added_cond_kwargs=cond)
        model[0] = "movq"
        latents = torch.empty(1, decoder.config["latent_channels"], latent, latent, device="meta", dtype=dtype)
        decoder.decode(latents.contiguous(memory_format=last), force_not_quantize=True)
    return calls


@contextlib.contextmanager
def patched(patches: dict[tuple[Any, str], Any]) -> Iterator[None]:
    saved = {(owner, name): getattr(owner, name) for owner, name in patches}
    for (owner, name), value in patches.items():
        setattr(owner, name, value)
    try:
        yield
    finally:
        for (owner, name), value in saved.items():
            setattr(owner, name, value)


def inputs(call: Call, device: str, dtype: torch.dtype) -> dict[str, Any]:
    gen = torch.Generator(device).manual_seed(0)
    batch, channels = call.shape[:2]

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype)

    kwargs: dict[str, Any] = {
        "x": (randn(*call.shape) * 2 + 0.5).contiguous(memory_format=torch.channels_last),
        "weight": 1 + 0.3 * randn(channels),
        "bias": 0.3 * randn(channels),
    }
    if call.modulated:
        kwargs["scale_1"], kwargs["shift"] = 1 + 0.3 * randn(batch, channels, 1, 1), randn(batch, channels, 1, 1)
    if call.spatial is not None:
        kwargs["spatial"] = tuple(randn(*call.spatial).contiguous(memory_format=torch.channels_last) for _ in range(2))
    if call.in_bias:
        kwargs["in_bias"] = 0.3 * randn(channels)
    return kwargs


def pytorch(call: Call, x, weight, bias, scale_1=None, shift=None, spatial=None, in_bias=None) -> torch.Tensor:  # noqa: ANN001
    """The eager models' ops for the call (``norms.norm_act``; ``movq.SpatialNorm`` with whole-factor maps); with
    ``in_bias``, the add of its convolution's bias first, as PyTorch's convolution makes it."""
    if in_bias is not None:
        x = x + in_bias.view(-1, 1, 1)
    h = F.group_norm(x, call.groups, weight, bias, call.eps)
    if scale_1 is not None:
        h = torch.addcmul(shift, h, scale_1)
    if spatial is not None:
        (small_h, small_w), (height, width) = spatial[0].shape[-2:], x.shape[-2:]
        h = h.unflatten(3, (small_w, width // small_w)).unflatten(2, (small_h, height // small_h))
        scale, offset = (t[:, :, :, None, :, None] for t in spatial)
        h = torch.addcmul(offset, h, scale).flatten(4, 5).flatten(2, 3)
    return F.silu(h) if call.silu else h


def triton(call: Call, kwargs: dict[str, Any], small_group: int | None) -> Callable[[], torch.Tensor]:
    """``norms.group_norm_nhwc`` on the call with the one-kernel threshold ``small_group`` (None: the code's): its
    plan made once here, then the launches of that plan at each call, as a model's repeated calls make them."""
    plans: dict = {}
    threshold = norms._SMALL_GROUP if small_group is None else small_group

    def run() -> torch.Tensor:
        with patched({(norms, "_PLANS"): plans}):
            return norms.group_norm_nhwc(
                kwargs["x"],
                call.groups,
                kwargs["weight"],
                kwargs["bias"],
                call.eps,
                kwargs.get("scale_1"),
                kwargs.get("shift"),
                call.silu,
                kwargs.get("spatial"),
                kwargs.get("in_bias"),
            )

    with patched({(norms, "_SMALL_GROUP"): threshold}):
        run()  # makes the plan under that threshold
    return run


def gpu_us(fn: Callable[[], Any], calls: int = 20, replays: int = 10) -> float:
    """GPU µs per ``fn()``: ``calls`` calls captured in one CUDA graph as the fast path captures (after warm-up runs on
    a side stream, which compile the Triton variants), replayed ``replays`` times between two events."""
    graph, _ = fast._capture(lambda: [fn() for _ in range(calls)])
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    del graph
    return start.elapsed_time(end) * 1000 / (calls * replays)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=768, help="image side (latents: size / 8)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp16")
    parser.add_argument("--out", type=Path, help="the JSON to write (default bench/results/norm_paths_<device>.json)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("no GPU: run it with TRITON_INTERPRET=1 (each path once per call under Triton's interpreter)")
    device = "cuda" if cuda else "cpu"
    dtype = DTYPES[args.dtype] if cuda else torch.float32  # the interpreter computes in fp32
    calls = collect(args.size, dtype)
    small_limit = 4 * norms._SMALL_GROUP  # beyond this the one-kernel path is not a candidate: not timed
    rows, totals = [], collections.defaultdict(float)
    with torch.no_grad():
        for call, count in calls.items():
            kwargs = inputs(call, device, dtype)
            group_elements = call.shape[2] * call.shape[3] * call.shape[1] // call.groups
            paths = {"pytorch": lambda kw=kwargs, c=call: pytorch(c, **kw), "triton_three": triton(call, kwargs, 0)}
            if call.spatial is None and group_elements <= small_limit:
                paths["triton_one"] = triton(call, kwargs, 2**62)
            paths["triton_default"] = triton(call, kwargs, None)
            want = pytorch(call, **kwargs).float()
            row: dict[str, Any] = {**call._asdict(), "count": count, "group_elements": group_elements}
            for name, fn in paths.items():
                if name != "pytorch":
                    row[f"{name}_max_abs_diff"] = float(f"{(fn().float() - want).abs().max().item():.3g}")
                if cuda:
                    us = gpu_us(fn)
                    row[f"{name}_us"] = round(us, 2)
                    totals[f"{call.model}_{name}_us"] += count * us
            rows.append(row)
            timing = "  ".join(f"{k.removesuffix('_us')} {v:8.2f}" for k, v in row.items() if k.endswith("_us"))
            print(f"{call.model:4s} x{count:<2d} {call.shape} groups {call.groups} {timing}", flush=True)
    if cuda:  # the one-kernel path where it was timed, else the three kernels: what "triton_one" would total
        for model in ("unet", "movq"):
            totals[f"{model}_triton_one_where_timed_us"] = sum(
                r["count"] * r.get("triton_one_us", r["triton_three_us"]) for r in rows if r["model"] == model
            )
        for key, value in sorted(totals.items()):
            print(f"{key}: {value:.1f} µs")
    name = torch.cuda.get_device_name().replace(" ", "_").lower() if cuda else "cpu_interpreter"
    out = args.out or Path(__file__).parent / "results" / f"norm_paths_{name}.json"
    meta = {
        "what": "GPU µs per GroupNorm call of one UNet CFG step and one MoVQ decode, by path (CUDA-graph replays)",
        "device": torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter: differences only)",
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "size": args.size,
        "dtype": str(dtype).removeprefix("torch."),
        "small_group": norms._SMALL_GROUP,
        "small_tile": norms._SMALL_TILE,
        "command": " ".join(["python", "bench/norm_paths.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "totals_us": totals, "calls": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
