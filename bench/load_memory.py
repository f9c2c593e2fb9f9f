"""Peak resident memory of loading a full-size decoder UNet checkpoint, against the checkpoint's file size.

Writes a random-weight checkpoint of the official decoder UNet config (fp16 by default, as the hub's fp16 variant
ships, or fp32 with --dtype fp32), then loads it in a fresh process with ``from_pretrained`` and reads that process's
peak RSS (``ru_maxrss``). The baseline RSS of a process that has imported torch and kandinsky22 is reported too.

    python bench/load_memory.py --dir /tmp/k22-unet-full [--dtype fp16|fp32]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CONFIG = Path(__file__).resolve().parents[2] / "shared" / "reference" / "configs" / "kandinsky-2-2-decoder" / "unet"

CHILD = r"""
import json, resource, sys, time, torch
import kandinsky22.models.unet as u
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.time()
model = u.UNet2DConditionModel.from_pretrained(sys.argv[1])
took = time.time() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
# safetensors maps the file lazily: read every weight once so that the figure counts the data really in memory
with torch.no_grad():
    total = sum(float(p.float().sum()) for p in model.parameters())
touched = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"baseline_rss_kib": base, "peak_rss_kib_after_load": peak, "peak_rss_kib": touched, "load_s": round(took, 2), "params": model.num_parameters(),
       "dtype": str(model.dtype)}))
"""


def write_checkpoint(folder: Path, dtype: str) -> None:
    import torch

    from kandinsky22.models.unet import UNet2DConditionModel

    config = json.loads((CONFIG / "config.json").read_text())
    torch.manual_seed(0)
    model = UNet2DConditionModel.from_config(config)
    if dtype == "fp16":
        model = model.half()
    model.save_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", default="/tmp/k22-unet-full")
    parser.add_argument("--dtype", choices=["fp16", "fp32"], default="fp16")
    args = parser.parse_args()
    folder = Path(args.dir) / args.dtype
    weights = folder / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        subprocess.run(
            [
                sys.executable,
                "-c",
                f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                f"from load_memory import write_checkpoint; from pathlib import Path\n"
                f"write_checkpoint(Path({str(folder)!r}), {args.dtype!r})",
            ],
            check=True,
        )
    out = subprocess.run([sys.executable, "-c", CHILD, str(folder)], check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    size = weights.stat().st_size
    peak = result["peak_rss_kib"] * 1024
    growth = (result["peak_rss_kib"] - result["baseline_rss_kib"]) * 1024
    print(
        json.dumps(
            {
                **result,
                "file_bytes": size,
                "peak_over_file": round(peak / size, 3),
                "growth_over_file": round(growth / size, 3),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
