"""What a LoRA costs to load, reweight and unload on the full-size decoder UNet (official config, random weights),
and the memory its originals take: ``python bench/lora_apply.py [--dtype fp16] [--rank 4] [--out FILE]``.

The adapter has the 2023 training scripts' targets (every attention's to_q, to_k, to_v, to_out.0, add_k_proj,
add_v_proj) in their attention-processor format, written to a safetensors file first. The steps themselves cost
nothing extra: the adapter is merged into the weights (``kandinsky22.lora``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from kandinsky22 import lora
from kandinsky22.models.unet import UNet2DConditionModel

CONFIG = Path(__file__).parents[1].parent / "shared/reference/configs/kandinsky-2-2-decoder/unet/config.json"
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--out", default="bench/results/lora_apply_cpu.json")
    args = parser.parse_args()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]

    start = time.perf_counter()
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(json.loads(CONFIG.read_text()))
    unet = unet.to_empty(device="cpu").to(dtype).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(0.02))
    build_s = time.perf_counter() - start

    tensors = {}
    modules = [(n, m) for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(TARGETS)]
    for name, module in modules:
        if name.endswith("to_out.0"):
            attention, proj = name.rsplit(".", 2)[0], "to_out"
        else:
            attention, proj = name.rsplit(".", 1)
        for part, shape in (("down", (args.rank, module.in_features)), ("up", (module.out_features, args.rank))):
            tensors[f"{attention}.processor.{proj}_lora.{part}.weight"] = torch.randn(shape, generator=g) * 0.01
    with tempfile.TemporaryDirectory() as folder:
        file = Path(folder) / "pytorch_lora_weights.safetensors"
        save_file(tensors, str(file))
        timings = {}
        t = time.perf_counter()
        unet.load_attn_procs(folder, adapter_name="a")
        timings["load_and_merge_s"] = time.perf_counter() - t
        t = time.perf_counter()
        unet.set_adapters("a", 0.5)
        timings["set_adapters_s"] = time.perf_counter() - t
        t = time.perf_counter()
        unet.unload_lora()
        timings["unload_s"] = time.perf_counter() - t
        unet.load_attn_procs(folder, adapter_name="a")
        state = lora.state_of(unet)
        originals = sum(v.numel() * v.element_size() for v in state.originals.values())
        result = {
            "machine": platform.node(),
            "cpu_threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "dtype": args.dtype,
            "rank": args.rank,
            "adapted_modules": len(modules),
            "unet_parameters": sum(p.numel() for p in unet.parameters()),
            "lora_file_bytes": file.stat().st_size,
            "originals_bytes_on_cpu": originals,
            "build_s": build_s,
            **timings,
        }
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
