"""Where and how this process trains: seeds, its place among the processes (torchrun / accelerate launch), its
device and its precision. Decided once, before the model loads."""

from __future__ import annotations

import logging
import random
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from medtune.errors import MedtuneError
from medtune.models import bf16_supported, pick_device
from medtune.recipe import Recipe
from medtune.train.allocator import return_freed_memory_to_os
from medtune.train.distributed import Distributed, Single, setup

log = logging.getLogger("medtune")


@dataclass
class Runtime:
    """What start_runtime decided, as the trainer reads it."""

    dist: Single | Distributed
    device: torch.device
    bf16: bool

    @property
    def dtype(self) -> torch.dtype:
        """The frozen base weights' dtype: the compute dtype, so autocast never re-casts them."""
        return torch.bfloat16 if self.bf16 else torch.float32

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()


def start_runtime(recipe: Recipe) -> Runtime:
    """Seed, join the other processes (torchrun / accelerate launch), pick the device and the precision."""
    cfg = recipe.train
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    dist = setup(cfg.device, cfg.grad_accum, cfg.batch_size)
    if not dist.is_main:
        log.setLevel(logging.WARNING)
    device = pick_device(cfg.device) if isinstance(dist, Single) else dist.device
    if device.type == "cpu" and cfg.release_memory:
        return_freed_memory_to_os()
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and bf16_supported(device))
    if recipe.resume and dist.sharded:
        raise MedtuneError("resume=true is not supported under FSDP / DeepSpeed (sharded optimizer state); "
                           "resume with DDP or one process", field="resume")
    return Runtime(dist, device, bf16)
