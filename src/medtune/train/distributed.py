"""Scale out on the standard engines, never a launcher of our own.

`torchrun` (or `accelerate launch`, or a cluster's own launcher) starts one process per device and sets RANK,
WORLD_SIZE and LOCAL_RANK; accelerate's `Accelerator` then joins the process group (gloo on CPU, NCCL on GPU)
and wraps the model in DDP — or in FSDP / DeepSpeed when `accelerate launch --config_file` asks for them (see
recipes/launch/). One process without those variables trains exactly as before, without accelerate.

What the loop relies on:
- data: the endless stream of micro-batches (BatchPlan, epoch after epoch) is dealt round-robin, global
  micro-batch g to rank g mod world, so each sample is seen once per epoch across ranks, and N processes with
  accumulation A see the same micro-batches per optimizer step as one process with accumulation N·A;
- loss: every rank sums token losses over its micro-batches; the number of loss tokens of the whole step (all
  ranks) is summed first, so after DDP averages the gradients the update equals the single-process one;
- accumulation micro-steps do not all-reduce gradients (`accelerator.accumulate` → DDP `no_sync`) and DDP runs
  with `find_unused_parameters=False` (every LoRA parameter gets a gradient every step; set it true only for
  adapters that skip layers) and `broadcast_buffers=False` (the only buffers, rotary frequencies, are constants);
- only rank 0 writes the run directory, logs, plots and card.

FSDP and DeepSpeed go through the same accelerate calls but are untested here (no GPU, DeepSpeed not
installed): the adapter is gathered with `accelerator.get_state_dict` before saving; held-out evaluation and
sample answers are skipped (they call the model outside the engine), and resuming a sharded run is refused
(its optimizer state is sharded across ranks).
"""

from __future__ import annotations

import os
import sys
from contextlib import nullcontext

import torch

from medtune.errors import MedtuneError


def launched() -> bool:
    """Started by torchrun / accelerate launch with more than one process?"""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


class Single:
    """One process: plain PyTorch, the same calls as Distributed."""

    world, rank, is_main, sharded = 1, 0, True, False

    def prepare(self, module, optimizer):
        return module, optimizer

    def accumulate(self, module):
        return nullcontext()

    def backward(self, loss: torch.Tensor, step_loss_tokens: float, grad_accum: int) -> None:
        (loss / step_loss_tokens).backward()

    def sum(self, values: list[float]) -> list[float]:
        return list(values)

    def clip_grad_norm(self, params, max_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def adapter_state(self, module) -> dict | None:
        return None

    def broadcast(self, obj):
        return obj

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


class Distributed:
    """Several processes through accelerate: DDP (tested on CPU/gloo), FSDP or DeepSpeed (per accelerate config)."""

    def __init__(self, device_choice: str, grad_accum: int, batch_size: int):
        from accelerate import Accelerator, DistributedDataParallelKwargs
        from accelerate.utils import DistributedType

        cpu = device_choice == "cpu" or not torch.cuda.is_available()
        ddp = DistributedDataParallelKwargs(find_unused_parameters=False, broadcast_buffers=False)
        self.acc = Accelerator(cpu=cpu, gradient_accumulation_steps=grad_accum, kwargs_handlers=[ddp])
        if self.acc.gradient_accumulation_steps != grad_accum:  # an accelerate config set its own
            raise MedtuneError(f"the accelerate config asks for gradient_accumulation_steps="
                               f"{self.acc.gradient_accumulation_steps}; remove it there and set train.grad_accum",
                               field="train.grad_accum")
        self.world, self.rank, self.is_main = self.acc.num_processes, self.acc.process_index, self.acc.is_main_process
        self.device = self.acc.device
        kind = self.acc.distributed_type
        self.sharded = kind in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        if kind == DistributedType.DEEPSPEED:  # no dataloader is prepared, so DeepSpeed cannot infer it
            self.acc.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = batch_size

    def prepare(self, module, optimizer):
        return self.acc.prepare(module, optimizer)

    def accumulate(self, module):
        return self.acc.accumulate(module)

    def backward(self, loss: torch.Tensor, step_loss_tokens: float, grad_accum: int) -> None:
        # accelerate (or DeepSpeed) divides by grad_accum and DDP averages over ranks: undo both so the update
        # is sum(token losses of the step, all ranks) / step_loss_tokens, as in one process.
        self.acc.backward(loss * (grad_accum * self.world / step_loss_tokens))

    def sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        return self.acc.reduce(t, reduction="sum").tolist()

    def clip_grad_norm(self, params, max_norm: float) -> float:
        norm = self.acc.clip_grad_norm_(params, max_norm)
        # DeepSpeed clips inside its engine (gradient_clipping in its config) and may report no norm.
        return 0.0 if norm is None else float(norm)

    def adapter_state(self, module) -> dict | None:
        """Sharded engines: the full state dict, gathered (a collective: every rank calls it), keys as in the
        peft model. None otherwise (rank 0's replica is complete)."""
        if not self.sharded:
            return None
        full = self.acc.get_state_dict(module)
        return {k.removeprefix("model."): v for k, v in full.items()}

    def broadcast(self, obj):
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        self.acc.wait_for_everyone()

    def close(self) -> None:
        self.acc.end_training()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def setup(device_choice: str, grad_accum: int, batch_size: int) -> Single | Distributed:
    return Distributed(device_choice, grad_accum, batch_size) if launched() else Single()


def shard(stream, rank: int, world: int):
    """Global micro-batch g goes to rank g mod world (the stream starts at a multiple of world)."""
    for g, item in enumerate(stream):
        if g % world == rank:
            yield item


def launch(nproc: int, argv: list[str]) -> None:
    """`medtune train ... --nproc N`: become `torchrun --standalone --nproc_per_node N -m medtune.cli ARGV` (exec, so
    signals reach torchrun, which passes them to every process). Each process gets cores ÷ N threads unless
    OMP_NUM_THREADS is set: more would only make them wait for each other."""
    if nproc < 1:
        raise MedtuneError("--nproc must be at least 1", field="--nproc")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "medtune.cli", *argv]
    os.execvpe(sys.executable, cmd, env)
