"""kandinsky22: a from-scratch PyTorch implementation of the Kandinsky 2.2 text-to-image system.

Public names are imported lazily, so ``import kandinsky22`` stays cheap (the CLI starts fast).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    # models
    "UNet2DConditionModel": "kandinsky22.models.unet",
    "VQModel": "kandinsky22.models.movq",
    "PriorTransformer": "kandinsky22.models.prior",
    # schedulers
    "DDPMScheduler": "kandinsky22.schedulers",
    "DDIMScheduler": "kandinsky22.schedulers",
    "UnCLIPScheduler": "kandinsky22.schedulers",
    "DPMSolverMultistepScheduler": "kandinsky22.schedulers",
    "DPMSolverSDEScheduler": "kandinsky22.schedulers",
    "EulerDiscreteScheduler": "kandinsky22.schedulers",
    "EulerAncestralDiscreteScheduler": "kandinsky22.schedulers",
    "UniPCMultistepScheduler": "kandinsky22.schedulers",
    "LMSDiscreteScheduler": "kandinsky22.schedulers",
    "DPMSolverSinglestepScheduler": "kandinsky22.schedulers",
    "DEISMultistepScheduler": "kandinsky22.schedulers",
    "HeunDiscreteScheduler": "kandinsky22.schedulers",
    "KDPM2DiscreteScheduler": "kandinsky22.schedulers",
    "KDPM2AncestralDiscreteScheduler": "kandinsky22.schedulers",
    "PNDMScheduler": "kandinsky22.schedulers",
    # pipelines
    "ImagePipelineOutput": "kandinsky22.pipelines.base",
    "KandinskyPriorPipelineOutput": "kandinsky22.pipelines.base",
    "KandinskyV22PriorPipeline": "kandinsky22.pipelines.prior",
    "KandinskyV22PriorEmb2EmbPipeline": "kandinsky22.pipelines.prior",
    "KandinskyV22Pipeline": "kandinsky22.pipelines.decoder",
    "KandinskyV22Img2ImgPipeline": "kandinsky22.pipelines.img2img",
    "KandinskyV22InpaintPipeline": "kandinsky22.pipelines.inpaint",
    "KandinskyV22ControlnetPipeline": "kandinsky22.pipelines.controlnet",
    "KandinskyV22ControlnetImg2ImgPipeline": "kandinsky22.pipelines.controlnet",
    "KandinskyV22CombinedPipeline": "kandinsky22.pipelines.combined",
    "KandinskyV22Img2ImgCombinedPipeline": "kandinsky22.pipelines.combined",
    "KandinskyV22InpaintCombinedPipeline": "kandinsky22.pipelines.combined",
    "AutoPipelineForText2Image": "kandinsky22.pipelines.auto",
    "AutoPipelineForImage2Image": "kandinsky22.pipelines.auto",
    "AutoPipelineForInpainting": "kandinsky22.pipelines.auto",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kandinsky22' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
