"""The GroupNorm calls of one UNet CFG step and one MoVQ decode at full size, with the Triton norms switched on: by
the kernel path each takes, and the distinct kernel variants Triton would compile for them at first use; the same for
the resnets' residual kernel (``models.residual``), which runs where the norms do. Then, for the uncompiled fast
path's UNet step (fused projections), the other operators that launch a pass of their own on CUDA (convolutions with
a bias, whose bias PyTorch adds in a separate pass; concatenations, upsamplings, GEMMs, copies, adds) in H200 run 9's
form (``residual.FOLD_BIASES`` off, keys concatenated) and as it runs now.

Builds the official decoder UNet and MoVQ on the meta device (no weights, no GPU), lays them out channels_last as the
CUDA pipelines do, and calls them once (the UNet on a CFG batch, MoVQ on one latent) with stand-ins for the kernels
that record their launches. A norm whose groups hold at most ``kandinsky22.models.norms._SMALL_GROUP`` elements takes
the one-kernel path; the others take three kernels (MoVQ's spatial norms always). A variant is what Triton
specialises on at a launch: the kernel, its compile-time constants, the tensors' dtypes and whether the channel count
(the one integer argument it specialises) is a multiple of 16.

    python bench/unet_norms.py                # 768x768, fp16
    python bench/unet_norms.py --size 1024

Needs triton installed (``use_triton_norms`` checks for it; no kernel is compiled or run) and the official configs
in ``../shared/reference/configs``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kandinsky22.models import layers, norm_kernels, norms, residual
from kandinsky22.models.layers import FusibleProjections
from kandinsky22.models.movq import VQModel
from kandinsky22.models.unet import UNet2DConditionModel

CONFIGS = Path(__file__).parents[2] / "shared" / "reference" / "configs" / "kandinsky-2-2-decoder"


class Recorder:
    """Stands in for the kernels' module: ``kernel[grid](*args, **constants)`` records the variant and runs nothing."""

    KERNELS = ("stats", "finalize", "apply", "small", "residual")

    def __init__(self) -> None:
        self.launches: collections.Counter = collections.Counter()

    def __getattr__(self, kernel: str) -> Any:
        if kernel not in self.KERNELS:
            raise AttributeError(kernel)
        # where the kernel takes the channel count, its one specialised integer argument
        channels = getattr(norm_kernels, kernel).arg_names.index("channels")
        recorder = self

        class Launcher:
            arg_names = getattr(norm_kernels, kernel).arg_names  # the real kernel's parameters

            def __getitem__(self, grid: tuple[int, ...]) -> Any:
                def launch(*args: Any, **constants: Any) -> None:
                    dtypes = tuple(str(a.dtype).removeprefix("torch.") for a in args if isinstance(a, torch.Tensor))
                    aligned = args[channels] % 16 == 0
                    recorder.launches[(kernel, tuple(sorted(constants.items())), dtypes, aligned)] += 1

                return launch

        return Launcher()


def by_path(launches: collections.Counter) -> str:
    """Norms per path: each norm launches either the one kernel or the statistics kernel first."""
    small = sum(n for key, n in launches.items() if key[0] == "small")
    split = sum(n for key, n in launches.items() if key[0] == "stats")
    return f"{small + split} norms, {small} with one kernel, {split} with three"


def _config(folder: str) -> dict:
    config = json.loads((CONFIGS / folder / "config.json").read_text())
    return {k: v for k, v in config.items() if not k.startswith("_")}


class PassCounter(TorchDispatchMode):
    """Counts the operators that launch a pass of their own: convolutions (with a bias, which PyTorch's CUDA
    convolutions add in a separate pass, or without), concatenations, nearest upsamplings, GEMMs, copies."""

    def __init__(self) -> None:
        super().__init__()
        self.passes: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = func.__name__.split(".")[0]
        if name == "convolution":
            self.passes["convolution with bias" if args[2] is not None else "convolution"] += 1
        elif name in ("cat", "upsample_nearest2d", "addmm", "copy_", "add"):
            self.passes[name] += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=768, help="image side (latents: size / 8)")
    parser.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16")
    args = parser.parse_args()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    # The kernels' path for meta tensors: meta convolutions return NCHW whatever the layout, so only the rest of the
    # conditions is kept (a CUDA pipeline's channels_last models pass the layout check).
    applies = norms._triton_applies
    norms._triton_applies = lambda norm, x: applies(norm, x.contiguous(memory_format=torch.channels_last))
    residual_applies = residual._kernel_applies
    residual._kernel_applies = lambda x, h, *biases: residual_applies(
        x.contiguous(memory_format=torch.channels_last), h.contiguous(memory_format=torch.channels_last), *biases
    )
    os.environ["TRITON_INTERPRET"] = "1"  # tensors off CUDA (here: meta) count as the interpreter's
    recorder = Recorder()
    norms._kernels = lambda: recorder
    latent = args.size // 8

    with torch.device("meta"):
        unet = UNet2DConditionModel(**_config("unet")).to(dtype)
        movq = VQModel(**_config("movq")).to(dtype)
    for model in (unet, movq):
        model.to(memory_format=torch.channels_last)
        norms.use_triton_norms(model, enabled=True)
    sample = torch.empty(2, unet.config["in_channels"], latent, latent, device="meta", dtype=dtype)
    cond = {"image_embeds": torch.empty(2, unet.config["encoder_hid_dim"], device="meta", dtype=dtype)}
    latents = torch.empty(1, movq.config["latent_channels"], latent, latent, device="meta", dtype=dtype)
    last = torch.channels_last
    with torch.no_grad():
        unet(sample.contiguous(memory_format=last), torch.tensor(500, device="meta"), added_cond_kwargs=cond)
        unet_launches = recorder.launches.copy()
        movq.decode(latents.contiguous(memory_format=last), force_not_quantize=True)
    movq_launches = recorder.launches - unet_launches
    kinds = collections.Counter(key[0] for key in recorder.launches)
    print(f"{args.size}x{args.size}, {args.dtype}, Triton norms on:")
    for name, launches in (("UNet CFG step", unet_launches), ("MoVQ decode", movq_launches)):
        sums = sum(n for key, n in launches.items() if key[0] == "residual")
        print(f"  {name}: {by_path(launches)}, {sum(launches.values()) - sums} kernel launches; {sums} residual sums")
    print(f"  distinct kernel variants Triton compiles at first use: {len(recorder.launches)} {dict(kinds)}")

    # The uncompiled fast path's step (fused projections, the conditioning prepared per run): the operators that
    # launch a pass of their own on CUDA besides the norms, without the folds (H200 run 9's form) and with them.
    for module in unet.modules():
        if isinstance(module, FusibleProjections):
            module.fuse_projections()
    timestep = torch.tensor([500], device="meta")
    in_place_min = layers._IN_PLACE_MIN_PIXELS
    print("  uncompiled fast-path UNet CFG step, operators besides the norms:")
    try:
        with torch.no_grad():
            conditioning = unet.prepare_conditioning(cond, timestep).at(0)
            for fold in (False, True):
                residual.FOLD_BIASES = fold
                layers._IN_PLACE_MIN_PIXELS = in_place_min if fold else 2**62
                with PassCounter() as counter:
                    unet(sample.contiguous(memory_format=last), timestep, None, conditioning=conditioning)
                form = "bias folds, keys in place" if fold else "run 9's form"
                print(f"    {form}: {dict(sorted(counter.passes.items()))}")
    finally:
        residual.FOLD_BIASES, layers._IN_PLACE_MIN_PIXELS = True, in_place_min


if __name__ == "__main__":
    main()
