"""Samplers: the reference's exact ones (DDPM for the decoder, UnCLIP for the prior, DDIM) and fast ODE solvers
(DPM-Solver++, Euler, Euler-ancestral, UniPC, PNDM, …) and the stochastic DPM++ SDE, all reading and writing the reference's ``scheduler_config.json``.

Swap samplers with ``pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)``.
"""

from .base import SchedulerMixin, SchedulerOutput
from .ddim import DDIMScheduler
from .ddpm import DDPMScheduler, UnCLIPScheduler
from .deis import DEISMultistepScheduler
from .dpm_sde import DPMSolverSDEScheduler
from .dpm_singlestep import DPMSolverSinglestepScheduler
from .dpm_solver import DPMSolverMultistepScheduler
from .euler import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
from .lms import LMSDiscreteScheduler
from .noise import randn_tensor
from .pndm import PNDMScheduler
from .second_order import HeunDiscreteScheduler, KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler
from .unipc import UniPCMultistepScheduler

__all__ = [
    "DEISMultistepScheduler",
    "DDIMScheduler",
    "DDPMScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSDEScheduler",
    "DPMSolverSinglestepScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "LMSDiscreteScheduler",
    "PNDMScheduler",
    "HeunDiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "SchedulerMixin",
    "SchedulerOutput",
    "UnCLIPScheduler",
    "UniPCMultistepScheduler",
    "randn_tensor",
]
