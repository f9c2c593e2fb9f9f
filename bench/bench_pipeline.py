"""kandinsky22 against the reference (diffusers), side by side in one process, on the same random-weight components.

Builds the official full-size configs (or ``--tiny`` scaled-down ones) with random weights once, as kandinsky22
models on the device; the reference's UNet, MoVQ and prior get copies of the same state dicts (the keys are
identical), and both pipelines share the transformers CLIP towers and an offline tokenizer. Then, in this order
(each step is skipped when the ``--budget-s`` deadline would be passed; results are written after every
measurement, so a run killed by its time limit keeps what it measured):

1. equality: the same seed gives the same image (max |diff| on [0, 1] images, fp16 tolerance ``--tol``);
2. eager text2img end to end, kandinsky22 vs reference, 1 image at the main size; ours as it runs (channels_last on
   CUDA) against the same models in NCHW;
3. per stage (text encoding, prior, decoder ms per UNet CFG step, MoVQ decode), peak GPU memory, MFU from a
   FlopCounterMode count, and host syncs inside the decoder loop (CUDA only);
4. kandinsky22's fast path (``enable_fast_path``): warm-up, equality with the eager images, speed;
5. the reference's documented recipe (channels_last + ``torch.compile(mode="reduce-overhead", fullgraph=True)``
   on the decoder UNet): warm-up, speed;
6. 4 images per call, fast path vs compiled reference (both or neither: each compiles the new batch size);
7. diagnostics: where fp16 rounding makes the two part (stage by stage), and ``enable_model_cpu_offload`` (on CUDA:
   peak memory, and the GPU memory each model adds when it runs);
8. 4 images per call, eager both;
9. the other sizes (eager both; the fast path).

    python bench/bench_pipeline.py --tiny                      # CPU, a few minutes
    python bench/bench_pipeline.py --budget-s 480              # GPU, full size (see bench/gpu_check.sh)
    python bench/bench_pipeline.py --plan followup             # GPU, a second call: equality, eager, 4-image compiled

Needs diffusers (the reference) next to kandinsky22; the package itself never imports it.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import importlib.metadata
import json
import os
import platform
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

START = time.perf_counter()

import torch  # noqa: E402
import transformers  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import kandinsky22  # noqa: E402
from kandinsky22 import tiny  # noqa: E402
from kandinsky22.models import norms  # noqa: E402

# ----------------------------------------------------------------------------------------------------------------------
# Configs: the official ones (shared/reference/configs) and scaled-down ones for --tiny
# ----------------------------------------------------------------------------------------------------------------------

UNET = {
    "act_fn": "silu",
    "addition_embed_type": "image",
    "addition_embed_type_num_heads": 64,
    "attention_head_dim": 64,
    "block_out_channels": [384, 768, 1152, 1536],
    "cross_attention_dim": 768,
    "down_block_types": ["ResnetDownsampleBlock2D"] + ["SimpleCrossAttnDownBlock2D"] * 3,
    "encoder_hid_dim": 1280,
    "encoder_hid_dim_type": "image_proj",
    "in_channels": 4,
    "layers_per_block": 3,
    "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
    "out_channels": 8,
    "resnet_time_scale_shift": "scale_shift",
    "sample_size": 64,
    "up_block_types": ["SimpleCrossAttnUpBlock2D"] * 3 + ["ResnetUpsampleBlock2D"],
}
MOVQ = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 256, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 3 + ["AttnDownEncoderBlock2D"],
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "norm_type": "spatial",
    "num_vq_embeddings": 16384,
    "out_channels": 3,
    "sample_size": 32,
    "up_block_types": ["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * 3,
    "vq_embed_dim": 4,
}
PRIOR = {
    "num_attention_heads": 32,
    "attention_head_dim": 64,
    "num_layers": 20,
    "embedding_dim": 1280,
    "num_embeddings": 77,
    "additional_embeddings": 4,
    "dropout": 0.0,
}
# CLIP ViT-bigG/14 towers (kandinsky-2-2-prior/{text,image}_encoder/config.json)
TEXT = {
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 1280,
    "layer_norm_eps": 1e-5,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
VISION = {
    "hidden_size": 1664,
    "intermediate_size": 8192,
    "num_hidden_layers": 48,
    "num_attention_heads": 16,
    "patch_size": 14,
    "image_size": 224,
    "projection_dim": 1280,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
}
TINY_TOWER = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}
TINY_TEXT = {**TEXT, **TINY_TOWER, "projection_dim": tiny.TINY_EMBED_DIM, "vocab_size": tiny.tiny_vocab_size()}
TINY_VISION = {**VISION, **TINY_TOWER, "projection_dim": tiny.TINY_EMBED_DIM, "image_size": 32, "patch_size": 4}

DECODER_SCHEDULER = {k: v for k, v in tiny.DECODER_SCHEDULER.items() if not k.startswith("_")}
PRIOR_SCHEDULER = {k: v for k, v in tiny.PRIOR_SCHEDULER.items() if not k.startswith("_")}
PROMPT = "red cat, 4k photo"

# Dense fp16/bf16 tensor-core peaks (no sparsity), for MFU.
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


# ----------------------------------------------------------------------------------------------------------------------
# Results, budget, timing
# ----------------------------------------------------------------------------------------------------------------------


class Results:
    """A JSON file rewritten after every measurement; also printed as it goes."""

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path = path
        self.data: dict[str, Any] = {"meta": meta, "results": {}, "skipped": {}, "errors": {}}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.save()

    def save(self) -> None:
        self.data["meta"]["elapsed_s"] = round(time.perf_counter() - START, 1)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        tmp.replace(self.path)

    def put(self, key: str, value: Any, section: str = "results") -> None:
        self.data[section][key] = value
        print(f"[{time.perf_counter() - START:6.1f}s] {section}.{key} = {json.dumps(value)}", flush=True)
        self.save()


class Budget:
    def __init__(self, seconds: float) -> None:
        self.deadline = START + seconds

    def left(self) -> float:
        return self.deadline - time.perf_counter()


def per_call_ms(fn: Callable[[], Any], iters: int, cuda: bool) -> float:
    """Mean ms per call of ``iters`` calls: CUDA events around them on the GPU, wall time on the CPU."""
    if cuda:
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        begin.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return begin.elapsed_time(end) / iters
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) * 1000 / iters


def kernel_times(fn: Callable[[], Any], iters: int, cuda: bool) -> dict[str, tuple[float, float]]:
    """``iters`` calls of ``fn`` under torch.profiler: per kernel name (its first 90 characters), its time in ms and
    its launches, per call. On the CPU the "kernels" are the aten operators that do the work themselves, timed by
    their self CPU time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(iters):
            fn()
        if cuda:
            torch.cuda.synchronize()
    kind = DeviceType.CUDA if cuda else DeviceType.CPU
    events = [e for e in prof.key_averages() if e.device_type == kind]
    if not cuda:
        events = [e for e in events if e.key.startswith("aten::")]

    def self_us(e: Any) -> float:
        for attr in ("self_device_time_total", "self_cuda_time_total", "self_cpu_time_total"):
            if cuda == (attr != "self_cpu_time_total") and hasattr(e, attr):
                return float(getattr(e, attr))
        return 0.0

    times: dict[str, tuple[float, float]] = {}
    for e in events:  # (names cut to 90 characters can meet: their figures add up)
        ms, count = times.get(e.key[:90], (0.0, 0.0))
        times[e.key[:90]] = (ms + self_us(e) / 1000 / iters, count + e.count / iters)
    return times


def rounded(value: Any, digits: int = 4) -> Any:
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v, digits) for v in value]
    return value


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
        self.cuda = self.device.type == "cuda"
        # the Triton norms' section: on CUDA, or on the CPU under Triton's interpreter (a check of the code path)
        self.triton_norms = norms.triton_available() and (self.cuda or norms._interpreting())
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
        if not self.cuda:
            self.dtype = torch.float32  # CPU half-precision kernels are not what anyone runs
        elif self.dtype == torch.float32:
            # fp32 on a GPU is for the equality check without half-precision rounding: true fp32, not TF32.
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        if self.cuda and args.cudnn_benchmark == "process":
            # PyTorch keeps one cuDNN plan per convolution shape for the whole process, chosen at the shape's first
            # use, by timing only where this is on then: on from the start, every path (ours and the reference's,
            # eager and compiled) runs the timed plans. Off, the eager runs before the fast path would leave their
            # heuristic plans to it (H200 run 12: a UNet step's kernels 12.4 ms instead of 10.9).
            torch.backends.cudnn.benchmark = True
        self.budget = Budget(args.budget_s)
        out = Path(args.out or os.environ.get("OUT") or Path(__file__).parent / "results")
        name = (
            "bench_pipeline_tiny_cpu.json"
            if args.tiny
            else f"bench_pipeline{'' if args.dtype == 'fp16' else '_' + args.dtype}"
            f"{'' if args.plan == 'full' else '_' + args.plan}.json"
        )
        self.results = Results(out / name, self.meta())
        self.images: dict[str, torch.Tensor] = {}
        # Seconds, until measured in this run: on an H200 (second run) our warm-up took 121 s, the reference's 65 s.
        self.estimates = {"fast_warmup": 20.0 if args.tiny else 125.0, "ref_compile": 20.0 if args.tiny else 70.0}

    # -- bookkeeping --------------------------------------------------------------------------------------------

    def meta(self) -> dict[str, Any]:
        import diffusers

        a = self.args
        meta = {
            "device": torch.cuda.get_device_name() if self.cuda else f"cpu ({platform.processor() or 'unknown'})",
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if self.cuda else None,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "triton": importlib.metadata.version("triton") if norms.triton_available() else None,
            "kandinsky22": kandinsky22.__version__,
            "python": platform.python_version(),
            "cpu_threads": torch.get_num_threads(),
            "settings": {
                "tiny": a.tiny,
                "dtype": str(self.dtype).removeprefix("torch."),
                "size": a.size,
                "sizes": a.sizes,
                "steps": a.steps,
                "prior_steps": a.prior_steps,
                "guidance_scale": 4.0,
                "prior_guidance_scale": 4.0,
                "scheduler": "DDPM (official decoder config), UnCLIP prior",
                "repeats": a.repeats,
                "budget_s": a.budget_s,
                "tol": a.tol,
                "compile_backend": a.backend,
                "compile_scope": a.compile_scope,
                "cudnn_benchmark": a.cudnn_benchmark,
                "tf32": torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32 if self.cuda else None,
                "prompt": PROMPT,
            },
        }
        return meta

    def section(self, name: str, estimate_s: float, fn: Callable[[], None]) -> None:
        """Run one measurement unless the deadline would be passed; an exception is recorded, not fatal."""
        left = self.budget.left()
        if left < estimate_s:
            self.results.put(name, f"skipped: needs ~{estimate_s:.0f} s, {left:.0f} s left", "skipped")
            return
        try:
            fn()
        except Exception as err:  # a failed measurement must not cost the ones after it
            traceback.print_exc()
            self.results.put(name, f"{type(err).__name__}: {err}"[:2000], "errors")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def spin_up(self) -> None:
        """On CUDA, keep the GPU busy for ~0.1 s before a timed call, so that every call starts at the clock a busy
        GPU runs at. In H200 runs 2 and 3 our eager pipeline was 15-30 % slower when it alternated with the
        reference (whose GPU idles on host syncs) than when it alternated with another copy of itself; a clock
        lowered during the other pipeline's call is one possible cause, not established."""
        if self.cuda:
            torch.cuda._sleep(int(0.1 * 2e9))  # a spin kernel of ~2e8 cycles: ~0.1 s at the H200's 1.98 GHz
            torch.cuda.synchronize()

    def timed(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        self.sync()
        start = time.perf_counter()
        out = fn()
        self.sync()
        return time.perf_counter() - start, out

    def per_call_ms(self, fn: Callable[[], Any], iters: int) -> float:
        """Mean ms per call after one warm-up call (CUDA events on the GPU)."""
        fn()
        return per_call_ms(fn, iters, self.cuda)

    def generator(self, seed: int = 0) -> torch.Generator:
        return torch.Generator(self.device).manual_seed(seed)

    # -- building -------------------------------------------------------------------------------------------------

    def build(self) -> None:
        import diffusers

        a = self.args
        unet_cfg = tiny.tiny_unet_config(4, "image") if a.tiny else UNET
        movq_cfg = tiny.tiny_movq_config() if a.tiny else MOVQ
        prior_cfg = tiny.tiny_prior_config() if a.tiny else PRIOR
        text_cfg, vision_cfg = (TINY_TEXT, TINY_VISION) if a.tiny else (TEXT, VISION)
        start = time.perf_counter()
        torch.manual_seed(0)
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)  # random init directly in the run dtype, on the device
        try:
            with torch.device(self.device):
                unet = kandinsky22.UNet2DConditionModel(**unet_cfg)
                movq = kandinsky22.VQModel(**movq_cfg)
                prior = kandinsky22.PriorTransformer(**prior_cfg)
                # The checkpoint's CLIP statistics and learned tokens are zeros at init (the embeddings would all
                # be 0): give them values so that the prior matters to the image.
                with torch.no_grad():
                    prior.clip_std.fill_(1.0)
                    prior.positional_embedding.normal_(std=0.02)
                    prior.prd_embedding.normal_(std=0.02)
                text = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**text_cfg))
                vision = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**vision_cfg))
                ref_models = [
                    diffusers.UNet2DConditionModel(**unet_cfg),
                    diffusers.VQModel(**movq_cfg),
                    diffusers.PriorTransformer(**prior_cfg),
                ]
        finally:
            torch.set_default_dtype(default_dtype)
        for ours, ref in zip((unet, movq, prior), ref_models):
            ref.load_state_dict(ours.state_dict(), strict=True)  # same keys: a strict copy
        for model in (unet, movq, prior, text, vision, *ref_models):
            model.eval().requires_grad_(False)
        folder = tiny.write_tiny_tokenizer(Path(tempfile.mkdtemp()) / "tokenizer")
        tokenizer = transformers.CLIPTokenizer.from_pretrained(folder)
        processor_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
        processor = processor_cls(crop_size=vision_cfg["image_size"], size=vision_cfg["image_size"])
        shared = {
            "prior_image_encoder": vision,
            "prior_text_encoder": text,
            "prior_tokenizer": tokenizer,
            "prior_image_processor": processor,
        }
        self.ours = kandinsky22.KandinskyV22CombinedPipeline(
            unet=unet,
            scheduler=kandinsky22.DDPMScheduler(**DECODER_SCHEDULER),
            movq=movq,
            prior_prior=prior,
            prior_scheduler=kandinsky22.UnCLIPScheduler(**PRIOR_SCHEDULER),
            **shared,
        )
        ref_unet, ref_movq, ref_prior = ref_models
        self.ref = diffusers.KandinskyV22CombinedPipeline(
            unet=ref_unet,
            scheduler=diffusers.DDPMScheduler(**DECODER_SCHEDULER),
            movq=ref_movq,
            prior_prior=ref_prior,
            prior_scheduler=diffusers.UnCLIPScheduler(**PRIOR_SCHEDULER),
            **shared,
        )
        # The compiled paths change their models in place (layout, fused projections, compiled calls): they get copies,
        # so that the eager pipelines stay eager for the measurements after them.
        copies = {"unet": copy.deepcopy(unet), "movq": copy.deepcopy(movq), "prior_prior": copy.deepcopy(prior)}
        self.fast_pipe = kandinsky22.KandinskyV22CombinedPipeline(**{**self.ours.components, **copies})
        self.ref_compiled = diffusers.KandinskyV22CombinedPipeline(
            **{**self.ref.components, "unet": copy.deepcopy(ref_unet)}
        )
        for pipe in (self.ours, self.ref, self.fast_pipe, self.ref_compiled):
            pipe.set_progress_bar_config(disable=True)
        self.sync()
        params = {
            "unet": unet.num_parameters(),
            "movq": movq.num_parameters(),
            "prior": prior.num_parameters(),
            "text_encoder": sum(p.numel() for p in text.parameters()),
            "image_encoder": sum(p.numel() for p in vision.parameters()),
        }
        self.results.put("build", {"seconds": round(time.perf_counter() - start, 1), "params": params})

    # -- running the pipelines ------------------------------------------------------------------------------------

    def run(self, pipe: Any, size: int, images: int = 1, steps: int | None = None, prior_steps: int | None = None):
        """One text2img call; returns [0, 1] images (N, 3, H, W) as float32 (the reference's "pt" is [-1, 1])."""
        out = pipe(
            prompt=[PROMPT] * images,
            num_inference_steps=steps or self.args.steps,
            prior_num_inference_steps=prior_steps or self.args.prior_steps,
            height=size,
            width=size,
            generator=self.generator(),
            output_type="pt",
        ).images
        ours = isinstance(pipe, kandinsky22.KandinskyV22CombinedPipeline)
        return out.float() if ours else (out.float() * 0.5 + 0.5).clamp(0, 1)

    def e2e(self, entries: dict[str, Any], size: int, images: int = 1, repeats: int | None = None) -> dict[str, Any]:
        """End-to-end time of each pipeline in ``entries`` (key → pipeline): one first call (reported apart: it shows
        any compilation left), then ``repeats`` rounds in which the pipelines take turns, so that a load change on a
        shared machine hits them alike. Wall and process-CPU seconds (the best of the rounds), and peak GPU memory."""
        measured: dict[str, dict[str, Any]] = {}
        for key, pipe in entries.items():
            self.spin_up()
            first, image = self.timed(lambda pipe=pipe: self.run(pipe, size, images))
            self.images[key] = image
            measured[key] = {"first_call_s": first, "times_s": [], "cpu_times_s": []}
        for _ in range(repeats or self.args.repeats):
            for key, pipe in entries.items():
                before = torch.cuda.memory_allocated() if self.cuda else 0
                if self.cuda:
                    torch.cuda.reset_peak_memory_stats()
                self.spin_up()
                cpu = time.process_time()
                seconds, _ = self.timed(lambda pipe=pipe: self.run(pipe, size, images))
                measured[key]["cpu_times_s"].append(time.process_time() - cpu)
                measured[key]["times_s"].append(seconds)
                if self.cuda:
                    extra = torch.cuda.max_memory_allocated() - before
                    weights = gpu_weight_bytes(pipe)
                    measured[key].update(
                        weights_on_gpu_GiB=weights / 2**30,
                        run_extra_GiB=extra / 2**30,
                        peak_alone_GiB=(weights + extra) / 2**30,
                        process_peak_GiB=torch.cuda.max_memory_allocated() / 2**30,
                    )
        for key, value in measured.items():
            best = min(value["times_s"])
            value.update(best_s=best, best_cpu_s=min(value["cpu_times_s"]), images_per_s=images / best)
            if self.cuda:
                del value["cpu_times_s"]  # the host mostly waits for the GPU: CPU time says little there
            self.results.put(key, rounded(value))
        return measured

    def compare(self, key: str, a: str, b: str) -> None:
        """Max |a - b| on [0, 1] images, with the images' mean and std (a saturated image would compare trivially)."""
        x, y = self.images[a], self.images[b]
        abs_diff = (x - y).abs().flatten()
        diff = float(abs_diff.max())
        value = {
            "max_abs_diff": diff,
            "p99_9_abs_diff": float(abs_diff.kthvalue(max(1, int(0.999 * abs_diff.numel()))).values),
            "mean_abs_diff": float(abs_diff.mean()),
            "tol": self.args.tol,
            "equal": diff <= self.args.tol,  # False for NaN images too
            "image_mean_std": [float(x.mean()), float(x.std())],
        }
        self.results.put(key, rounded(value, 6))

    # -- measurements ---------------------------------------------------------------------------------------------

    def equality(self) -> None:
        size = self.args.size
        for name, pipe in (("ours", self.ours), ("ref", self.ref)):
            self.run(pipe, 64 if self.args.tiny else 512, steps=2, prior_steps=2)  # cuDNN / allocator warm-up
            self.images[f"{name}_eager_{size}"] = self.run(pipe, size)
        self.compare(f"equal_eager_vs_ref_{size}", f"ours_eager_{size}", f"ref_eager_{size}")

    def divergence(self) -> None:
        """Where ours and the reference part, stage by stage from the same inputs: the prior's embeddings (same seed),
        the decoder's final latents from the same embeddings, and MoVQ's images from the same latents. Random
        weights amplify fp16 rounding far more than trained ones would; these figures tell which stage does."""
        size, a = self.args.size, self.args
        pairs = {"ours": self.ours, "ref": self.ref}
        embeds = {
            name: pipe.prior_pipe(PROMPT, num_inference_steps=a.prior_steps, generator=self.generator()).to_tuple()
            for name, pipe in pairs.items()
        }
        emb, neg = (t.to(self.dtype) for t in embeds["ours"])
        latents = {
            name: pipe.decoder_pipe(
                image_embeds=emb,
                negative_image_embeds=neg,
                height=size,
                width=size,
                num_inference_steps=a.steps,
                generator=self.generator(),
                output_type="latent",
            ).images.float()
            for name, pipe in pairs.items()
        }
        with torch.no_grad():
            z = latents["ours"].to(self.dtype)
            images = {
                name: pipe.decoder_pipe.movq.decode(z, force_not_quantize=True).sample.float()
                for name, pipe in pairs.items()
            }

        def rel(x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
            x, y = x.float(), y.float()
            return {"max_abs": float((x - y).abs().max()), "max_abs_ref": float(y.abs().max())}

        value = {
            "prior_image_embeds": rel(embeds["ours"][0], embeds["ref"][0]),
            "decoder_latents_same_embeds": rel(latents["ours"], latents["ref"]),
            "movq_images_same_latents_in_0_1": {"max_abs": float(((images["ours"] - images["ref"]) / 2).abs().max())},
        }
        self.results.put(f"divergence_{size}", rounded(value, 6))

    def eager(self, size: int, images: int = 1) -> None:
        ours, ref = f"ours_eager_e2e_{size}_bs{images}", f"ref_eager_e2e_{size}_bs{images}"
        self.e2e({ours: self.ours, ref: self.ref}, size, images)
        self.ratio(f"ratio_eager_ours_over_ref_{size}_bs{images}", ours, ref)
        if not self.cuda:
            self.ratio(f"ratio_eager_ours_over_ref_cpu_time_{size}_bs{images}", ours, ref, "best_cpu_s")

    def eager_layouts(self, size: int) -> None:
        """Our eager pipeline as it runs (on CUDA the pipelines lay the UNet and MoVQ out channels_last) against the
        same models in NCHW, alternating. Runs on the fast path's model copies, not yet compiled."""
        pipe = self.fast_pipe
        for model in (pipe.decoder_pipe.unet, pipe.decoder_pipe.movq):
            model.to(memory_format=torch.contiguous_format)
        again, nchw = f"ours_eager_again_e2e_{size}_bs1", f"ours_eager_nchw_e2e_{size}_bs1"
        self.e2e({again: self.ours, nchw: pipe}, size)
        self.ratio(f"ratio_eager_as_it_runs_over_nchw_{size}", again, nchw)
        self.compare(f"equal_eager_as_it_runs_vs_nchw_{size}", again, nchw)

    def eager_graphs(self, size: int) -> None:
        """Our eager models with the fast path's CUDA graphs and nothing else of it (no compilation, no fused
        projections): the UNet and prior calls captured once, replayed at every step. Against our eager pipeline and
        the reference's eager, alternating; on the fast path's model copies, not yet compiled, whose graphs are then
        dropped. CUDA only (the graphs are CUDA graphs)."""
        from kandinsky22 import fast

        pipe = self.fast_pipe
        pipe.to(self.device)  # as the pipelines lay their models out (eager_layouts left these NCHW)
        models = (pipe.decoder_pipe.unet, pipe.prior_pipe.prior)
        for model in models:
            model._compiled_call_impl = fast.CudaGraphCall(model, model._call_impl)
        graphs = f"ours_eager_cuda_graphs_e2e_{size}_bs1"
        try:
            self.e2e(
                {
                    graphs: pipe,
                    f"ours_eager_again2_e2e_{size}_bs1": self.ours,
                    f"ref_eager_again_e2e_{size}_bs1": self.ref,
                },
                size,
            )
        finally:
            for model in models:
                fast.drop_cuda_graphs(model)
            torch.cuda.empty_cache()
        self.ratio(f"ratio_eager_cuda_graphs_over_ref_eager_{size}", graphs, f"ref_eager_again_e2e_{size}_bs1")
        self.ratio(f"ratio_eager_cuda_graphs_over_eager_{size}", graphs, f"ours_eager_again2_e2e_{size}_bs1")
        self.compare(f"equal_eager_cuda_graphs_vs_eager_{size}", graphs, f"ours_eager_{size}")

    def eager_fused(self, size: int) -> None:
        """Our eager models with the fast path's fused projections and nothing else of it (one GEMM for each
        attention's q/k/v and added k/v, and the prior's): end to end against our eager pipeline and the reference's,
        alternating, and the images against both; then the same with the Triton norms too, where they run. Is fusing
        worth doing in eager mode by default? On the fast path's model copies, which the fast path fuses anyway;
        after the sections that need them unfused."""
        from kandinsky22 import fast
        from kandinsky22.models.layers import FusibleProjections

        pipe = self.fast_pipe
        pipe.to(self.device)  # as the pipelines lay their models out
        for component in pipe.components.values():
            for module in component.modules() if isinstance(component, torch.nn.Module) else ():
                if isinstance(module, FusibleProjections):
                    module.fuse_projections()
        fused, ours_again, ref_again = (
            f"ours_fused_e2e_{size}_bs1",
            f"ours_eager_again4_e2e_{size}_bs1",
            f"ref_eager_again4_e2e_{size}_bs1",
        )
        timed = {fused: pipe, ours_again: self.ours, ref_again: self.ref}
        self.e2e(timed, size)
        self.ratio(f"ratio_fused_over_ref_eager_{size}", fused, ref_again)
        self.ratio(f"ratio_fused_over_eager_{size}", fused, ours_again)
        self.compare(f"equal_fused_vs_eager_{size}", fused, f"ours_eager_{size}")
        self.compare(f"equal_fused_vs_ref_{size}", fused, f"ref_eager_{size}")
        if not self.triton_norms:
            return
        both = f"ours_fused_triton_norms_e2e_{size}_bs1"
        fast.use_triton_norms(pipe)
        try:
            self.e2e({both: pipe, ref_again: self.ref}, size)
        finally:
            fast.use_triton_norms(pipe, enabled=False)
        self.ratio(f"ratio_fused_triton_norms_over_ref_eager_{size}", both, ref_again)
        self.compare(f"equal_fused_triton_norms_vs_ref_{size}", both, f"ref_eager_{size}")

    def eager_triton_norms(self, size: int) -> None:
        """Our eager models with the UNet's and MoVQ's GroupNorms through the Triton kernels (``fast.use_triton_norms``:
        channels_last kept, modulation and SiLU folded in): end to end against our eager pipeline and the reference's,
        alternating; the images against both eager pipelines (the equality gate); the kernel profile and the stages.
        On the fast path's model copies, not yet compiled, switched back after. Then, on CUDA, the fast path without
        compilation (``compile_scope="none"``: fused projections and CUDA graphs) with the Triton norms, on fresh
        copies: its warm-up, end to end against the reference's eager, its stages and its kernel profile. On CUDA also
        our Triton-norm pipeline with every launch through Triton's dispatch (``norms._direct_launch`` off), against
        the direct launches. On the CPU only under Triton's interpreter (TRITON_INTERPRET=1)."""
        from kandinsky22 import fast

        pipe = self.fast_pipe
        pipe.to(self.device)  # as the pipelines lay their models out
        ours, ref = f"ours_eager_{size}", f"ref_eager_{size}"
        norms_key, graphs_key = f"ours_triton_norms_e2e_{size}_bs1", f"ours_uncompiled_fast_triton_norms_e2e_{size}_bs1"
        ours_again, ref_again = f"ours_eager_again3_e2e_{size}_bs1", f"ref_eager_again3_e2e_{size}_bs1"
        self.results.put("triton_norms_switched", fast.use_triton_norms(pipe))
        try:
            self.e2e({norms_key: pipe, ours_again: self.ours, ref_again: self.ref}, size)
            self.ratio(f"ratio_triton_norms_over_ref_eager_{size}", norms_key, ref_again)
            self.ratio(f"ratio_triton_norms_over_eager_{size}", norms_key, ours_again)
            # False if a direct launch raised and every launch went through Triton's dispatch since
            self.results.put("triton_direct_launches_on", norms._direct_launch)
            if self.cuda:  # the same with every launch through Triton's dispatch (the seventh session's launches)
                dispatched = f"ours_triton_norms_dispatched_e2e_{size}_bs1"
                norms._direct_launch = False
                try:
                    self.e2e({dispatched: pipe}, size)
                finally:
                    norms._direct_launch = True
                self.ratio(f"ratio_triton_norms_direct_over_dispatched_{size}", norms_key, dispatched)
            self.compare(f"equal_triton_norms_vs_eager_{size}", norms_key, ours)
            self.compare(f"equal_triton_norms_vs_ref_{size}", norms_key, ref)
            self.kernel_profile("eager_triton_norms", {"ours_triton_norms": pipe})
            self.stages("eager_triton_norms", {"ours_triton_norms": pipe})
        finally:
            fast.use_triton_norms(pipe, enabled=False)
        if not self.cuda:
            return
        uncompiled, warm = self.uncompiled_fast(size)
        self.results.put(f"ours_uncompiled_fast_triton_norms_warmup_{size}_bs1", warm)
        try:
            self.e2e({graphs_key: uncompiled, ref_again: self.ref}, size)
            self.ratio(f"ratio_uncompiled_fast_triton_norms_over_ref_eager_{size}", graphs_key, ref_again)
            self.compare(f"equal_uncompiled_fast_triton_norms_vs_ref_{size}", graphs_key, ref)
            # its UNet step (one graph replay) and MoVQ decode (eager, Triton norms), against the compiled fast path's
            # (stages_compiled, full plan): is compiling worth its warm-up?
            self.stages("uncompiled_fast_triton_norms", {"ours_uncompiled_fast_triton_norms": uncompiled})
            # its step's kernels in the graph replay, against the eager step's busy time above (run 8: 14.1 ms a
            # replay for 12.5 ms of kernels in eager mode; the compiled step's replays lost 0.7 ms to gaps)
            self.kernel_profile("uncompiled_fast_triton_norms", {"ours_uncompiled_fast_triton_norms": uncompiled})
        finally:
            del uncompiled
            torch.cuda.empty_cache()

    def uncompiled_fast(self, size: int) -> tuple[Any, dict[str, Any]]:
        """Our fast path without compilation (``compile_scope="none"``: fused projections, channels_last and, on CUDA,
        CUDA graphs and the Triton norms where Triton runs) on fresh copies of the UNet, MoVQ and prior, warmed up for
        one image at ``size``; and its warm-up (seconds in all and per model)."""
        components = self.ours.components
        copies = {name: copy.deepcopy(components[name]) for name in ("unet", "movq", "prior_prior")}
        pipe = kandinsky22.KandinskyV22CombinedPipeline(**{**components, **copies})
        pipe.set_progress_bar_config(disable=True)
        start = time.perf_counter()
        warm = pipe.enable_fast_path(shapes=[(size, size, 1)], negative_prompts=False, compile_scope="none")
        return pipe, rounded({"seconds": time.perf_counter() - start, **warm})

    def uncompiled_vs_compiled(self, size: int) -> None:
        """The fast path without compilation against the compiled one, in one run: warm-up, end to end alternating,
        the images against our eager pipeline's, and its stages (the compiled one's are ``stages_compiled``). Run 8
        timed them in two calls: 0.797 s after a 0.56 s warm-up against 0.705 s after 78.9 s. If the uncompiled path
        comes within a few per cent, it can be the default scope where the Triton norms run."""
        pipe, warm = self.uncompiled_fast(size)
        key, fast_key = f"ours_uncompiled_fast_e2e_{size}_bs1", f"ours_fast_again_e2e_{size}_bs1"
        self.results.put(f"ours_uncompiled_fast_warmup_{size}_bs1", warm)
        try:
            self.e2e({key: pipe, fast_key: self.fast_pipe}, size)
            self.ratio(f"ratio_uncompiled_fast_over_fast_{size}", key, fast_key)
            self.compare(f"equal_uncompiled_fast_vs_eager_{size}", key, f"ours_eager_{size}")
            self.stages("uncompiled_fast", {"ours_uncompiled_fast": pipe})
        finally:
            del pipe
            if self.cuda:
                torch.cuda.empty_cache()

    def unet_step(self, pipe: Any) -> tuple[Callable[[], Any], torch.Tensor]:
        """One UNet CFG step of ``pipe`` at ``--size`` (batch 2), called as its pipeline's loop calls it — ours with
        the conditioning prepared once per run, with the run's timesteps (this is the row of the step measured) —,
        and the latents it runs on (for the MoVQ decode)."""
        latent = self.args.size // 8
        dtype, dev = self.dtype, self.device
        gen = torch.Generator(dev).manual_seed(3)
        sample = torch.randn(2, 4, latent, latent, device=dev, dtype=dtype, generator=gen)
        width = self.ours.unet.config.encoder_hid_dim
        cond = {"image_embeds": torch.randn(2, width, device=dev, dtype=dtype, generator=gen)}
        t = torch.tensor(500, device=dev)
        unet = pipe.decoder_pipe.unet
        # The arguments as each pipeline's loop passes them: a compiled model sees the same call (another keyword set
        # would make dynamo compile it again, ~1 min at full size), our CUDA graphs the captured signature.
        if isinstance(pipe, kandinsky22.KandinskyV22CombinedPipeline):
            conditioning = unet.prepare_conditioning(cond, t.reshape(1)).at(0)
            return (
                lambda: unet(sample, t, encoder_hidden_states=None, conditioning=conditioning, return_dict=False)
            ), sample
        return (
            lambda: unet(
                sample=sample, timestep=t, encoder_hidden_states=None, added_cond_kwargs=cond, return_dict=False
            )
        ), sample

    def kernel_profile(self, tag: str, pipes: dict[str, Any]) -> None:
        """Where one UNet CFG step's time goes (torch.profiler, 5 steps): the device's busy time (the sum of its
        kernels' times) against the wall time — their gap is the host overhead the GPU waits for —, the kernel
        count, and the 8 kernels (or, on the CPU, operators) taking the most time."""
        iters = 5
        row: dict[str, Any] = {}
        with torch.no_grad():
            for name, pipe in pipes.items():
                step, _ = self.unet_step(pipe)
                wall_ms = self.per_call_ms(step, iters)
                times = kernel_times(step, iters, self.cuda)
                busy_ms = sum(ms for ms, _ in times.values())
                top = sorted(times.items(), key=lambda item: -item[1][0])[:8]
                row[name] = {
                    "wall_ms_per_step": wall_ms,
                    "busy_ms_per_step": busy_ms,
                    "busy_fraction": busy_ms / wall_ms if wall_ms else None,
                    "kernels_per_step": sum(count for _, count in times.values()),
                    "top": {key: round(ms, 3) for key, (ms, _) in top},
                }
        self.results.put(f"kernel_profile_{tag}_{self.args.size}", rounded(row))

    def stages(self, tag: str, pipes: dict[str, Any]) -> None:
        """Per-stage timings of ``pipes`` (name → pipeline), the best of a few rounds in which the pipelines take turns;
        the text encoder is shared, so it is timed once."""
        a, size = self.args, self.args.size
        iters = 10 if a.tiny else 20
        dev = self.device
        emb, neg = self.ours.prior_pipe(PROMPT, num_inference_steps=2, generator=self.generator()).to_tuple()
        tokens = self.ours.prior_tokenizer([PROMPT, ""], padding="max_length", max_length=77, return_tensors="pt")
        ids = tokens.input_ids.to(dev)

        def measures(pipe: Any, other_form: bool) -> dict[str, Callable[[], float]]:
            movq = pipe.decoder_pipe.movq
            unet_step, sample = self.unet_step(pipe)
            unet_ms = lambda: self.per_call_ms(unet_step, iters)  # noqa: E731
            decode = lambda: movq.decode(sample[:1], force_not_quantize=True)  # noqa: E731
            movq_ms = lambda: self.per_call_ms(decode, max(2, iters // 4))  # noqa: E731
            prior = lambda: pipe.prior_pipe(  # noqa: E731
                PROMPT, num_inference_steps=a.prior_steps, generator=self.generator(), output_type="pt"
            )
            decoder = lambda: pipe.decoder_pipe(  # noqa: E731
                image_embeds=emb,
                negative_image_embeds=neg,
                height=size,
                width=size,
                num_inference_steps=a.steps,
                generator=self.generator(),
                output_type="latent",
            )
            others = {
                "prior_stage_other_form_s": lambda: self.other_form(pipe, prior),
                "unet_cfg_step_upsample_first_ms": lambda: self.upsample_first(unet_ms),
                "movq_decode_upsample_first_ms": lambda: self.upsample_first(movq_ms),
                "movq_decode_other_layout_ms": lambda: self.other_layout(movq, movq_ms),
            }
            return {
                "unet_cfg_step_ms": unet_ms,
                "movq_decode_ms": movq_ms,
                "prior_stage_s": lambda: self.timed(prior)[0],
                "decoder_loop_ms_per_step": lambda: self.timed(decoder)[0] * 1000 / a.steps,
                **(others if other_form else {}),
            }

        row: dict[str, Any] = {}
        # Our eager prior also in the context form it does not choose by default (kv vs tokens, see PriorContext),
        # and our UNet step and MoVQ decode with the convolutions after an upsampling done the reference's way
        # (upsample, then convolve; see UpsampleConv2d), to check those choices on this device.
        todo = {name: measures(pipe, name == "ours" and tag == "eager") for name, pipe in pipes.items()}
        with torch.no_grad():
            for _ in range(3 if a.tiny else 2):
                for name, metrics in todo.items():
                    for metric, measure in metrics.items():
                        value = measure()
                        row[f"{name}_{metric}"] = min(value, row.get(f"{name}_{metric}", value))
            row["text_encoding_ms_shared"] = self.per_call_ms(lambda: self.ours.prior_text_encoder(ids), iters)
        flops = self.results.data["results"].get("unet_flops", {}).get("unet_cfg_step")
        peak = self.peak_flops()
        for name in pipes if flops else []:
            seconds = row[f"{name}_unet_cfg_step_ms"] / 1000
            row[f"{name}_unet_tflops_per_s"] = flops / seconds / 1e12
            if peak:
                row[f"{name}_unet_mfu"] = flops / seconds / peak
        self.results.put(f"stages_{tag}_{size}", rounded(row))

    @staticmethod
    def upsample_first(measure: Callable[[], float]) -> float:
        """``measure()`` with our UpsampleConv2d upsampling first, at any input size (not with its phase kernels)."""
        from kandinsky22.models import layers

        threshold = layers._PHASES_MIN_PIXELS
        layers._PHASES_MIN_PIXELS = 2**62
        try:
            return measure()
        finally:
            layers._PHASES_MIN_PIXELS = threshold

    @staticmethod
    def other_layout(model: torch.nn.Module, measure: Callable[[], float]) -> float:
        """``measure()`` with ``model`` in the memory layout it does not have (NCHW on CUDA, where the pipelines make
        it channels_last; channels_last elsewhere). H200 run 4 timed our eager MoVQ decode at 70.9 ms channels_last,
        where run 2 had timed 50.9 ms NCHW: this measures both in one run."""
        kernel = next(w for w in model.parameters() if w.ndim == 4 and w.shape[1] > 1 and w.shape[-1] > 1)
        channels_last = kernel.is_contiguous(memory_format=torch.channels_last)
        model.to(memory_format=torch.contiguous_format if channels_last else torch.channels_last)
        try:
            return measure()
        finally:
            model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    def other_form(self, pipe: Any, run: Callable[[], Any]) -> float:
        """Seconds of ``run`` with our prior forced into the context form its default does not pick here."""
        prior = pipe.prior_pipe.prior
        prior.cache_prompt = not prior.caches_prompt()
        try:
            return self.timed(run)[0]
        finally:
            prior.cache_prompt = None

    def peak_flops(self) -> float | None:
        if not self.cuda:
            return None
        name = torch.cuda.get_device_name()
        return next((v for k, v in PEAK_FLOPS.items() if k in name), None)

    def flops(self) -> None:
        """FlopCounterMode counts of one UNet CFG step, one MoVQ decode, one prior CFG step, one whole call."""
        a, size = self.args, self.args.size
        latent, dev, dtype = size // 8, self.device, self.dtype
        unet, movq, prior = self.ours.unet, self.ours.movq, self.ours.prior_prior
        sample = torch.randn(2, 4, latent, latent, device=dev, dtype=dtype)
        embeds = torch.randn(2, unet.config.encoder_hid_dim, device=dev, dtype=dtype)
        width = prior.config.embedding_dim
        x = torch.randn(2, width, device=dev, dtype=dtype)
        hidden = torch.randn(2, 77, width, device=dev, dtype=dtype)
        counts = {}
        with torch.no_grad():
            for name, fn in (
                ("unet_cfg_step", lambda: unet(sample, 500, added_cond_kwargs={"image_embeds": embeds})),
                ("movq_decode", lambda: movq.decode(sample[:1], force_not_quantize=True)),
                ("prior_cfg_step", lambda: prior(x, 500, proj_embedding=x, encoder_hidden_states=hidden)),
            ):
                with FlopCounterMode(display=False) as counter:
                    fn()
                counts[name] = counter.get_total_flops()
        counts["text2img_total"] = (
            a.steps * counts["unet_cfg_step"] + a.prior_steps * counts["prior_cfg_step"] + counts["movq_decode"]
        )
        self.results.put("unet_flops", {"size": size, **counts})

    def sync_check(self) -> None:
        """Host syncs inside the decoder loop: steps 1… run under torch.cuda.set_sync_debug_mode("warn"). Also ours
        with a CPU generator per image, as the CLI and the server seed: the DDPM noise of each step is drawn on the
        CPU and must reach the GPU without a blocking copy."""
        counts = {}
        cases = (("ours", self.ours, None), ("ref", self.ref, None), ("ours_cpu_generator", self.ours, "cpu"))
        for name, pipe, generator_device in cases:

            def start_checking(pipe, step, timestep, tensors):
                if step == 0:
                    torch.cuda.set_sync_debug_mode("warn")
                return tensors

            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    pipe(
                        prompt=PROMPT,
                        num_inference_steps=10,
                        prior_num_inference_steps=2,
                        height=self.args.size,
                        width=self.args.size,
                        generator=[torch.Generator("cpu").manual_seed(0)] if generator_device else self.generator(),
                        output_type="latent",
                        callback_on_step_end=start_checking,
                    )
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            where = collections.Counter(
                f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)
            )
            counts[f"{name}_syncs_in_9_decoder_steps"] = sum(where.values())
            counts[f"{name}_sync_sites"] = dict(where.most_common(5))  # the Python lines that waited
        self.results.put("host_syncs", counts)

    @staticmethod
    @contextlib.contextmanager
    def cold_compile_caches() -> Iterator[None]:
        """Empty compile caches (Inductor's and Triton's, on disk and in memory) for one warm-up measurement, so that
        neither library's compile time profits from kernels the other one (or an earlier run) already built; real
        users get these caches on a second start. Kept on disk afterwards: compiled code may still read them. The
        compile worker processes are restarted inside, so that they too use the fresh folders."""
        from torch._inductor.async_compile import shutdown_compile_workers
        from torch._inductor.utils import fresh_cache

        with fresh_cache(delete=False):
            shutdown_compile_workers()
            yield

    @staticmethod
    def compile_phases() -> dict[str, float]:
        """Seconds spent so far in each phase of torch.compile (dynamo tracing, AOT, Inductor, Triton builds...), the
        12 largest, from ``torch._dynamo.utils.compile_times``: where a warm-up's time goes."""
        from torch._dynamo.utils import compile_times

        names, values = compile_times(repr="csv", aggregate=True)
        phases = sorted(((float(v), n) for n, v in zip(names, values)), reverse=True)[:12]
        return {name: round(seconds, 2) for seconds, name in phases}

    def fast(self, shapes: list[tuple[int, int, int]], key: str, pipe: Any = None, scope: str | None = None) -> None:
        """Our fast path on ``pipe`` (default the fast pipeline) in ``scope`` (default ``--compile-scope``), warmed
        up for ``shapes`` from cold compile caches; records the warm-up under ``key``."""
        start = time.perf_counter()
        with self.cold_compile_caches():
            # The benchmark's prompts have no negative prompt: the prior's doubled batch is not warmed up.
            warm = (pipe or self.fast_pipe).enable_fast_path(
                shapes=shapes,
                backend=self.args.backend,
                negative_prompts=False,
                compile_scope=scope or self.args.compile_scope,
            )
        seconds = time.perf_counter() - start
        if pipe is None:
            self.estimates["fast_warmup"] = seconds
        phases = self.compile_phases()  # cumulative over the process: the first warm-up's are ours alone
        self.results.put(key, rounded({"shapes": shapes, "seconds": seconds, "per_model_s": warm, "phases": phases}, 2))

    def movq_compiled(self, size: int) -> None:
        """MoVQ's decoder compiled block by block, as the fast path compiled it until the ninth session, against MoVQ
        eager with the Triton norms, as the fast path now leaves it where they run (else, and on the CPU, eager with
        PyTorch's norms): the compilation's seconds from cold caches, both decodes alternating, and their images. Both
        on copies of our eager MoVQ, channels_last, so that either plan can run it."""
        from kandinsky22 import fast
        from kandinsky22.models.movq import VQModel

        latent = size // 8
        gen = torch.Generator(self.device).manual_seed(3)
        latents = torch.randn(1, 4, latent, latent, device=self.device, dtype=self.dtype, generator=gen)
        models = {
            name: copy.deepcopy(self.ours.movq).to(memory_format=torch.channels_last) for name in ("compiled", "eager")
        }
        for module in models["compiled"].decoder.modules():
            if isinstance(module, fast.BLOCKS[VQModel]):
                fast._compile(module, self.args.backend)
        triton = self.triton_norms and self.cuda  # (not under the interpreter: seconds per decode)
        eager = "eager_triton_norms" if triton else "eager"
        if triton:
            norms.use_triton_norms(models["eager"])
        decode = {
            "compiled": lambda: models["compiled"].decode(latents, force_not_quantize=True),
            eager: lambda: models["eager"].decode(latents, force_not_quantize=True),
        }
        with torch.no_grad():
            row: dict[str, Any] = {}
            for name, fn in decode.items():  # the first call: compilation, or the Triton variants' (cold caches)
                start = time.perf_counter()
                with self.cold_compile_caches():
                    fn()
                self.sync()
                row[f"{name}_first_call_s"] = time.perf_counter() - start
            for _ in range(2):
                for name, fn in decode.items():
                    ms = self.per_call_ms(fn, 10)
                    row[f"{name}_decode_ms"] = min(ms, row.get(f"{name}_decode_ms", ms))
            images = {name: fn().sample.float() for name, fn in decode.items()}
            row["max_abs_diff"] = (images["compiled"] - images[eager]).abs().max().item() / 2  # on [0, 1]
        self.results.put(f"movq_compiled_{size}", rounded(row))
        models.clear()  # the copies' memory

    def fast_other_scope(self, size: int) -> None:
        """Our fast path in the other ``compile_scope`` ("model" against "blocks"), on fresh copies of the eager
        models, against the main scope's fast path in the same run: its warm-up from cold caches, the end-to-end time
        (the two alternating), the UNet CFG step, and the images against our eager ones."""
        scope = "model" if self.args.compile_scope == "blocks" else "blocks"
        ours = self.ours.components
        copies = {name: copy.deepcopy(ours[name]) for name in ("unet", "movq", "prior_prior")}
        pipe = kandinsky22.KandinskyV22CombinedPipeline(**{**ours, **copies})
        pipe.set_progress_bar_config(disable=True)
        self.fast([(size, size, 1)], f"ours_fast_{scope}_warmup_{size}_bs1", pipe, scope)
        main, other = f"ours_fast_{self.args.compile_scope}_again_e2e_{size}_bs1", f"ours_fast_{scope}_e2e_{size}_bs1"
        self.e2e({main: self.fast_pipe, other: pipe}, size)
        self.ratio(f"ratio_fast_{scope}_over_{self.args.compile_scope}_{size}", other, main)
        self.compare(f"equal_fast_{scope}_vs_eager_{size}", other, f"ours_eager_{size}")
        iters = 10 if self.args.tiny else 20
        with torch.no_grad():
            steps = {name: self.unet_step(p)[0] for name, p in ((main, self.fast_pipe), (other, pipe))}
            step_ms = {name: self.per_call_ms(step, iters) for name, step in steps.items()}
        self.results.put(f"unet_cfg_step_ms_by_scope_{size}", rounded(step_ms, 3))
        del pipe, copies, steps
        if self.cuda:
            torch.cuda.empty_cache()

    def ref_compile(self, images: int = 1) -> None:
        """The reference's documented recipe, on a copy of its UNet, with its warm-up (compile) time for ``images``
        images per call."""
        unet = self.ref_compiled.decoder_pipe.unet
        unet.to(memory_format=torch.channels_last)
        options = {"mode": "reduce-overhead"} if self.args.backend == "inductor" else {"backend": self.args.backend}
        self.ref_compiled.decoder_pipe.unet = torch.compile(unet, fullgraph=True, **options)
        with self.cold_compile_caches():
            seconds, _ = self.timed(
                lambda: self.run(self.ref_compiled, self.args.size, images=images, steps=3, prior_steps=2)
            )
        self.estimates["ref_compile"] = seconds
        self.results.put("ref_compiled_warmup_s" + ("" if images == 1 else f"_bs{images}"), round(seconds, 1))
        self.results.put("compile_phases_after_ref_warmup", self.compile_phases())  # cumulative: ours + the reference

    def offload(self) -> None:
        """``enable_model_cpu_offload`` on a pipeline sharing our modules: the GPU memory each model adds when it
        starts (its own weights, if offloading does what it should), the run's peak above what the other pipelines
        keep resident, the time, and the image (equal to the one without offloading). On the CPU (--tiny) only the
        mechanics and the image are checked: the memory figures are zeros there."""
        size = self.args.size
        allocated = torch.cuda.memory_allocated if self.cuda else lambda: 0
        pipe = kandinsky22.KandinskyV22CombinedPipeline(**self.ours.components)
        pipe.set_progress_bar_config(disable=True)
        names = ("prior_text_encoder", "prior_prior", "unet", "movq")
        starts: dict[str, float] = {}
        hooks = []
        for name in names:
            module = getattr(pipe, name)

            def record(module: Any, args: Any, name: str = name) -> None:
                starts.setdefault(name, allocated())

            hooks.append((module.decoder if name == "movq" else module).register_forward_pre_hook(record))
        pipe.enable_model_cpu_offload(device=self.device)
        try:
            self.run(pipe, size, steps=2, prior_steps=2)
            starts.clear()
            base = allocated()
            if self.cuda:
                torch.cuda.reset_peak_memory_stats()
            seconds, image = self.timed(lambda: self.run(pipe, size))
            peak = torch.cuda.max_memory_allocated() - base if self.cuda else 0
        finally:
            for hook in hooks:
                hook.remove()
            pipe.to(self.device)  # back on the GPU for what follows (the modules are shared)
        weights = {name: model_bytes(getattr(pipe, name)) / 2**30 for name in names}
        value = {
            "e2e_s": seconds,
            "peak_above_resident_GiB": peak / 2**30,
            "added_GiB_when_model_starts": {name: (v - base) / 2**30 for name, v in starts.items()},
            "model_weights_GiB": weights,
            "max_abs_diff_vs_without_offload": float((image - self.images[f"ours_eager_{size}"]).abs().max()),
        }
        self.results.put(f"ours_model_offload_{size}", rounded(value))

    # -- the plan -------------------------------------------------------------------------------------------------

    def main(self) -> None:
        a, size = self.args, self.args.size
        self.section("build", 0, self.build)
        if not hasattr(self, "ours"):
            return
        cheap = 5.0 if a.tiny else 25.0  # seconds an eager measurement needs at most
        if a.plan != "full":
            if a.plan == "followup":
                self.followup(size, cheap)
            else:  # "compiled": the equality gate, then the compiled pair and their stages
                self.section("equality", cheap, self.equality)
                self.section("flops", 2, self.flops)
                self.compiled_sections(size, cheap)
            self.results.put("total_s", round(time.perf_counter() - START, 1))
            return
        self.eager_sections(size, cheap)
        self.section("flops", 2, self.flops)
        self.section("stages_eager", cheap, lambda: self.stages("eager", {"ours": self.ours, "ref": self.ref}))
        self.section(
            "kernel_profile_eager", cheap, lambda: self.kernel_profile("eager", {"ours": self.ours, "ref": self.ref})
        )
        if self.cuda:
            self.section("host_syncs", cheap, self.sync_check)
        done = self.compiled_sections(size, cheap)
        if "fast" in done:  # the other compile scope, for its warm-up and speed against this one's
            # H200: "model" warmed up in 120.8 s (run 2), "blocks" in 87.6 s (run 4)
            factor = 1.5 if a.compile_scope == "blocks" else 0.75
            self.section(
                "fast_other_scope",
                factor * self.estimates["fast_warmup"] + 2 * cheap,
                lambda: self.fast_other_scope(size),
            )

        # 4 images per call, compiled: both or neither (each compiles the new batch size; one alone gives no ratio)
        if done == {"fast", "ref"}:
            estimate = 0.8 * self.estimates["fast_warmup"] + self.estimates["ref_compile"] + 2 * cheap
            self.section("compiled_bs4", estimate, lambda: self.compiled_bs4(size, compile_ref=False))
        # diagnostics: where fp16 makes the two part, and model offloading's memory
        self.section("divergence", cheap, self.divergence)
        self.section("offload", cheap, self.offload)
        self.section("eager_bs4", 2 * cheap, lambda: self.eager(size, 4))

        # the other sizes: eager both, then the fast path
        others = [other for other in a.sizes if other != size]
        for other in others:
            self.section(f"eager_{other}", 2 * cheap, lambda other=other: self.eager(other))
        for other in others if "fast" in done else []:

            def fast_other(other: int = other) -> None:
                self.fast([(other, other, 1)], f"ours_fast_warmup_{other}_bs1")
                self.e2e({f"ours_fast_e2e_{other}_bs1": self.fast_pipe}, other)

            self.section(f"fast_{other}", 0.8 * self.estimates["fast_warmup"] + cheap, fast_other)
        self.results.put("total_s", round(time.perf_counter() - START, 1))

    def compiled_sections(self, size: int, cheap: float) -> set[str]:
        """Our fast path (its warm-up from cold caches, end to end, the images against both eager pipelines) and the
        reference with its compile recipe, then their stages and kernel profiles, our fast path without compilation
        against it, and MoVQ compiled against MoVQ as the fast path runs it; returns which of the two compiled
        ("fast", "ref")."""
        done: set[str] = set()

        def fast_bs1() -> None:
            self.fast([(size, size, 1)], f"ours_fast_warmup_{size}_bs1")
            done.add("fast")
            self.e2e({f"ours_fast_e2e_{size}_bs1": self.fast_pipe}, size)
            self.compare(f"equal_fast_vs_eager_{size}", f"ours_fast_e2e_{size}_bs1", f"ours_eager_{size}")
            self.compare(f"equal_fast_vs_ref_{size}", f"ours_fast_e2e_{size}_bs1", f"ref_eager_{size}")

        def ref_bs1() -> None:
            self.ref_compile()
            done.add("ref")
            self.e2e({f"ref_compiled_e2e_{size}_bs1": self.ref_compiled}, size)
            # The reference against itself: the same pipeline, compiled or not. Its fp16 rounding noise floor.
            self.compare(f"equal_ref_compiled_vs_ref_eager_{size}", f"ref_compiled_e2e_{size}_bs1", f"ref_eager_{size}")

        self.section("fast", self.estimates["fast_warmup"] + cheap, fast_bs1)
        self.section("ref_compiled", self.estimates["ref_compile"] + cheap, ref_bs1)
        if done == {"fast", "ref"}:
            compiled = {"ours_fast": self.fast_pipe, "ref_compiled": self.ref_compiled}
            self.section("stages_compiled", cheap, lambda: self.stages("compiled", compiled))
            self.section("kernel_profile_compiled", cheap, lambda: self.kernel_profile("compiled", compiled))
            self.ratio("ratio_fast_over_ref_compiled", f"ours_fast_e2e_{size}_bs1", f"ref_compiled_e2e_{size}_bs1")
        self.ratio("ratio_fast_over_ref_eager", f"ours_fast_e2e_{size}_bs1", f"ref_eager_e2e_{size}_bs1")
        compiled_ours = self.args.compile_scope != "none"  # "none": the pair above is already the uncompiled one
        if "fast" in done and compiled_ours:  # the same fast path without compilation, against the compiled one
            self.section("uncompiled_vs_compiled", 3 * cheap, lambda: self.uncompiled_vs_compiled(size))
        if (
            "fast" in done and compiled_ours
        ):  # MoVQ compiled against eager with the Triton norms (as the fast path now runs it)
            self.section("movq_compiled", 30.0 + cheap, lambda: self.movq_compiled(size))
        return done

    def eager_sections(self, size: int, cheap: float) -> None:
        """The start of both plans: equality, eager end to end, the eager layouts, then on CUDA the eager models with
        CUDA graphs alone, where Triton is there its norms, and the eager models with fused projections."""
        self.section("equality", cheap, self.equality)
        self.section("eager", cheap, lambda: self.eager(size))
        self.section("eager_layouts", cheap, lambda: self.eager_layouts(size))
        if self.cuda:
            self.section("eager_graphs", cheap, lambda: self.eager_graphs(size))
        if self.triton_norms:
            self.section("eager_triton_norms", 3 * cheap, lambda: self.eager_triton_norms(size))
        self.section("eager_fused", 2 * cheap, lambda: self.eager_fused(size))

    def followup(self, size: int, cheap: float) -> None:
        """A shorter plan for a second device call: equality and the eager measurements (layouts, CUDA graphs alone,
        the Triton norms, kernel profile), MoVQ compiled against eager with the Triton norms, then the 4-image compiled
        pair, each side compiled for 4 images straight away (one compilation each, not the 1-image one first)."""
        self.eager_sections(size, cheap)
        self.section(
            "kernel_profile_eager", cheap, lambda: self.kernel_profile("eager", {"ours": self.ours, "ref": self.ref})
        )
        self.section("movq_compiled", 30.0 + cheap, lambda: self.movq_compiled(size))
        estimate = self.estimates["fast_warmup"] + self.estimates["ref_compile"] + cheap
        self.section("compiled_bs4", estimate, lambda: self.compiled_bs4(size, compile_ref=True))

    def compiled_bs4(self, size: int, compile_ref: bool) -> None:
        """4 images per call, our fast path and the compiled reference, each warmed up for them; ``compile_ref``:
        apply the reference's recipe here (else it was applied for 1 image, and its first 4-image call recompiles)."""
        ours4, ref4 = f"ours_fast_e2e_{size}_bs4", f"ref_compiled_e2e_{size}_bs4"
        self.fast([(size, size, 4)], f"ours_fast_warmup_{size}_bs4")
        self.e2e({ours4: self.fast_pipe}, size, 4, repeats=2)
        if compile_ref:
            self.ref_compile(images=4)
        self.e2e({ref4: self.ref_compiled}, size, 4, repeats=2)
        self.ratio("ratio_bs4_images_per_s_fast_over_ref_compiled", ref4, ours4)

    def ratio(self, key: str, numerator: str, denominator: str, field: str = "best_s") -> None:
        results = self.results.data["results"]
        if numerator in results and denominator in results:
            self.results.put(key, round(results[numerator][field] / results[denominator][field], 3))


def write_cpu_results(
    path: Path, what: str, script: str, argv: list[str] | None, results: dict, **settings: Any
) -> None:
    """The JSON of a CPU measurement script: what it measured, where, with which versions and command, and when."""
    import diffusers

    meta = {
        "what": what,
        "machine": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "kandinsky22": kandinsky22.__version__,
        **settings,
        "command": " ".join(["python", f"bench/{script}", *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    print(f"wrote {path}")


def model_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def gpu_weight_bytes(pipe: Any) -> int:
    """Bytes of the distinct parameter and buffer storages of ``pipe``'s models that are on the GPU."""
    seen, total = set(), 0
    for component in pipe.components.values():
        if not isinstance(component, torch.nn.Module):
            continue
        for tensor in [*component.parameters(), *component.buffers()]:
            if tensor.is_cuda and tensor.untyped_storage().data_ptr() not in seen:
                seen.add(tensor.untyped_storage().data_ptr())
                total += tensor.untyped_storage().nbytes()
    return total


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="scaled-down configs on the CPU")
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16", help="GPU dtype (CPU: fp32)")
    parser.add_argument("--size", type=int, help="main image size (default 768; --tiny: 128)")
    parser.add_argument("--sizes", type=int, nargs="+", help="all sizes (default 512 768 1024; --tiny: 64 128)")
    parser.add_argument("--steps", type=int, default=50, help="decoder steps")
    parser.add_argument("--prior-steps", type=int, default=25, help="prior steps")
    parser.add_argument("--repeats", type=int, help="timed rounds per end-to-end measurement (default 3; --tiny: 5)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="skip what would end after this many seconds")
    parser.add_argument("--tol", type=float, default=2e-2, help="max |diff| on [0, 1] images counted as equal")
    parser.add_argument(
        "--backend",
        help="torch.compile backend of both compiled paths (default inductor; --tiny: eager, which checks the graphs "
        "and the images but not the compiled speed: Inductor on a small CPU takes minutes to compile)",
    )
    parser.add_argument("--threads", type=int, help="CPU threads (--tiny default: 1, steadier on a shared machine)")
    parser.add_argument("--out", help="results folder (default: $OUT, else bench/results)")
    parser.add_argument(
        "--plan",
        choices=["full", "followup", "compiled"],
        default="full",
        help="full: every measurement (see above); followup: equality, the eager measurements (layouts, CUDA graphs, "
        "Triton norms, kernel profile) and the 4-image compiled pair only (a second device call); compiled: equality, "
        "then the compiled pair, their stages and MoVQ compiled or not (a call after a followup one)",
    )
    parser.add_argument(
        "--cudnn-benchmark",
        choices=["process", "fast-path"],
        default="process",
        help="process (default): cuDNN autotuning on from the start, for every path (PyTorch keeps the plan it "
        "found at a convolution shape's first use, for the whole process); fast-path: off until our fast path turns "
        "it on, as in runs 1-11 (the eager runs before it then leave it cuDNN's heuristic plans)",
    )
    parser.add_argument(
        "--compile-scope",
        choices=["blocks", "model", "none"],
        default="blocks",
        help="our fast path's compile_scope (default blocks); the full plan also measures the other one (the "
        "uncompiled scope, none, is measured with the Triton norms, where Triton is there)",
    )
    args = parser.parse_args(argv)
    args.size = args.size or (128 if args.tiny else 768)
    args.backend = args.backend or ("eager" if args.tiny else "inductor")
    args.repeats = args.repeats or (5 if args.tiny else 3)
    args.sizes = args.sizes or ([64, 128] if args.tiny else [512, 768, 1024])
    threads = args.threads or (1 if args.tiny else None)
    if threads:
        torch.set_num_threads(threads)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    bench = Bench(args)
    with contextlib.suppress(KeyboardInterrupt):
        bench.main()
    print(f"results: {bench.results.path}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
