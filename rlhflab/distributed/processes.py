"""One run over several processes: which share of the work is this process's, and the few collectives PPO needs.

Launched (`accelerate launch --multi_gpu --num_processes N -m rlhflab train ...`, or torchrun), `rlhflab train`
runs data-parallel: each process samples and scores its contiguous share of the rollout batch, the experience is
gathered so every process holds the whole batch and computes the same advantages (every batch statistic is
global by construction), and in the update each process trains its share of every minibatch while gradients
all-reduce through DDP or FSDP2. A plain `rlhflab train` is one process: no launcher, and every collective
here is the identity.

Accelerate starts the processes, sets up torch.distributed (gloo on CPU, NCCL on GPUs) and wraps models in DDP;
FSDP2 comes from Accelerate's FSDP plugin (the launch config's `fsdp_config`) and its FSDP2 preparation.
Accelerate enables FSDP only on accelerators, so on CPU we hand that same preparation the plugin the launch
config describes: the same code path on CPU (tested here) and GPU.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
from torch import nn

from rlhflab.config import Config
from rlhflab.distributed.launch import check_launch, launched
from rlhflab.errors import UserError
from rlhflab.models.loading import pick_device
from rlhflab.runs.checkpoint import load_optimizer_state, optimizer_state


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor as a whole: an FSDP2 shard (DTensor) gathered from every process (a collective), else itself."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def check_divisible(config: Config, world_size: int) -> None:
    """Each process samples whole prompts (their K answers stay together for RLOO/GRPO) and trains an equal share
    of every minibatch (data-parallel training runs the same backward passes everywhere)."""
    prompts, minibatch = config.rollout.prompts_per_iteration, config.ppo.minibatch_size
    for key, value in (("rollout.prompts_per_iteration", prompts), ("ppo.minibatch_size", minibatch)):
        if value % world_size:
            raise UserError(f"{key} {value} is not a multiple of the {world_size} processes; pick a multiple, or "
                            "launch a number of processes that divides it")


def fsdp_units(module: nn.Module) -> list[nn.Module]:
    """The module's FSDP2 units (modules `fully_shard` was applied to), outermost first; [] when not sharded."""
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


class Processes:
    """The processes of a run: rank, world size, device, and the collectives. `Processes()` is one process."""

    def __init__(self, device: torch.device | None = None, accelerator=None, fsdp_plugin=None):
        self.accelerator = accelerator
        self.fsdp_plugin = fsdp_plugin  # accelerate's FullyShardedDataParallelPlugin when sharding, else None
        self.rank = accelerator.process_index if accelerator else 0
        self.world_size = accelerator.num_processes if accelerator else 1
        self.device = accelerator.device if accelerator else (device or torch.device("cpu"))

    @classmethod
    def from_environment(cls, device: str = "auto") -> "Processes":
        """One process, or the launch this process belongs to (data-parallel with DDP, or FSDP2)."""
        check_launch()
        if not launched():
            return cls(device=pick_device(device))
        from accelerate import Accelerator
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        accelerator = Accelerator(cpu=not torch.cuda.is_available())
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            raise UserError("DeepSpeed launches are not supported; for sharded training launch with "
                            "configs/accelerate/fsdp.yaml (FSDP2, ZeRO-3-like sharding)")
        if accelerator.mixed_precision != "no":
            raise UserError(f"accelerate's mixed_precision is {accelerator.mixed_precision!r}: rlhflab sets precision "
                            "itself; launch with --mixed_precision no and set model.dtype in the recipe")
        plugin = None
        if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
            plugin = getattr(accelerator.state, "fsdp_plugin", None) or FullyShardedDataParallelPlugin()
            if plugin.fsdp_version != 2:
                raise UserError(f"FSDP version {plugin.fsdp_version} in the launch config: rlhflab runs FSDP2; set "
                                "fsdp_version: 2 (configs/accelerate/fsdp.yaml)")
            accelerator.state.fsdp_plugin = plugin  # on CPU accelerate leaves it unset (see the module docstring)
        return cls(accelerator=accelerator, fsdp_plugin=plugin)

    @property
    def is_main(self) -> bool:
        """Process 0 writes the run's files (metrics, samples, checkpoints, final/, the report)."""
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.fsdp_plugin is not None

    @property
    def kind(self) -> str:
        if self.world_size == 1:
            return "one process"
        return f"{'FSDP2' if self.sharded else 'DDP'}, {self.world_size} processes"

    def share(self, n: int) -> slice:
        """This process's contiguous share of n global rows: n // world_size of them, one more for the first
        n % world_size processes (the rollout's n is a multiple: `check_divisible`)."""
        k, extra = divmod(n, self.world_size)
        start = self.rank * k + min(self.rank, extra)
        return slice(start, start + k + (self.rank < extra))

    # -------------------------------------------------------------------------------------------------
    # collectives (the identity in one process)

    def gather(self, tensor: torch.Tensor | None, pad: float = 0, left: bool = False) -> torch.Tensor | None:
        """Every process's rows, concatenated in rank order: (b_rank, ...) -> (Σ b_rank, ...); with 2+ dimensions,
        dimension 1 is padded to the widest process's (`left`: in front, for left-padded prompts). Shares may
        differ in size; they travel as objects (experience is small next to the models)."""
        if self.world_size == 1 or tensor is None:
            return tensor
        parts = self.gather_objects([tensor.cpu()])
        if tensor.dim() > 1:
            width = max(p.shape[1] for p in parts)
            parts = [torch.nn.functional.pad(p, (width - p.shape[1], 0) if left else (0, width - p.shape[1]),
                                             value=pad) for p in parts]
        return torch.cat(parts).to(tensor.device)

    def gather_objects(self, items: list) -> list:
        """Every process's list items, concatenated in rank order."""
        if self.world_size == 1:
            return items
        from accelerate.utils import gather_object

        return gather_object(items)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor

    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        return tensor

    def any(self, flag: bool) -> bool:
        """True on every process if it is True on any (e.g. a stop request that reached one process)."""
        if self.world_size == 1:
            return flag
        return bool(self.max(torch.tensor(float(flag), device=self.device)).item())

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    # -------------------------------------------------------------------------------------------------
    # models

    def wrap(self, module: nn.Module, *example, trained: bool = True) -> nn.Module:
        """A module ready for data-parallel training: DDP (gradients all-reduced in backward) or FSDP2 (parameters
        sharded, gathered layer by layer); unchanged in one process, and a frozen (not `trained`) one under DDP.
        Build its optimizer after. `example`: the inputs of one forward pass run through the sharded module at
        once, because FSDP2 makes the first module to run forward its root, and sampling runs the model inside."""
        if self.world_size == 1 or (not trained and not self.sharded):
            return module
        if not self.sharded:
            return self.accelerator.prepare_model(module)
        from accelerate.utils import fsdp2_prepare_model

        module = fsdp2_prepare_model(self.accelerator, module)
        with torch.no_grad():
            module(*example)
        for unit in fsdp_units(module):  # units kept whole after forward would hand the optimizer whole tensors
            unit.reshard()
        return module

    @staticmethod
    def unwrap(module: nn.Module) -> nn.Module:
        """The module inside a DDP wrapper (FSDP2 shards in place: the module is itself)."""
        return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module

    @contextlib.contextmanager
    def no_sync(self, *modules: nn.Module):
        """Gradients accumulate locally inside (micro-batches before a minibatch's last); they all-reduce in
        the first backward after it."""
        with contextlib.ExitStack() as stack:
            for module in modules:
                if isinstance(module, nn.parallel.DistributedDataParallel):
                    stack.enter_context(module.no_sync())
                elif hasattr(module, "set_requires_gradient_sync"):  # FSDP2
                    module.set_requires_gradient_sync(False)
                    stack.callback(module.set_requires_gradient_sync, True)
            yield

    @contextlib.contextmanager
    def gathered(self, *modules: nn.Module | None):
        """Whole parameters inside, for work that runs a different number of forward passes on each process
        (sampling stops when a process's answers end): FSDP2 gathers every shard once on entry and keeps them
        until exit — memory: one full copy of the modules' parameters per process for that time. DDP and one
        process hold whole parameters already."""
        units = [unit for module in modules if module is not None for unit in fsdp_units(module)]
        for unit in units:
            unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()
        try:
            yield
        finally:
            for unit in units:
                unit.reshard()
                # training's setting, as torch documents for evals; it drops Accelerate's keep-whole choice for
                # the root and the final norm + LM head unit (one more all-gather of those in the backward)
                unit.set_reshard_after_forward(True, recurse=False)

    def full_state(self, module: nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
        """The module's whole tensors on the CPU, under the names of the module without its DDP wrapper:
        the trained parameters only (the adapters of a LoRA run), or the whole state dict. Sharded tensors are
        gathered: a collective, every process calls it."""
        module = self.unwrap(module)
        if trainable_only:
            items = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        else:
            items = list(module.state_dict().items())
        return {name: whole(tensor).detach().cpu().contiguous() for name, tensor in items}

    def load_full_state(self, module: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Load whole tensors (every process reads the same checkpoint) into a possibly sharded module."""
        module = self.unwrap(module)
        if not self.sharded:
            module.load_state_dict(state, strict=False)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, strict=False))

    def whole_model(self, module: nn.Module, fresh) -> nn.Module | None:
        """The module with all its weights, for saving: itself unless sharded; sharded, process 0 loads the
        gathered weights into `fresh()` (a new unsharded copy) and the others get None. Every process calls it."""
        if not self.sharded:
            return module
        state = self.full_state(module)
        if not self.is_main:
            return None
        model = fresh()
        model.load_state_dict(state)
        return model

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """`runs.checkpoint.optimizer_state` with whole tensors (a collective when sharded)."""
        saved = optimizer_state(optimizer)
        saved["state"] = [{k: whole(v) if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                          for s in saved["state"]]
        return saved

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, saved: dict) -> None:
        """Load whole optimizer tensors, each sharded like its parameter when the parameters are sharded."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if self.sharded:
            from torch.distributed.tensor import distribute_tensor

            saved = {**saved, "state": [
                {k: distribute_tensor(v.to(params[s["param"]].device), params[s["param"]].device_mesh,
                                      params[s["param"]].placements)
                 if isinstance(v, torch.Tensor) and v.shape == params[s["param"]].shape else v
                 for k, v in s.items()} for s in saved["state"]]}
        load_optimizer_state(optimizer, saved)

    def state_dict(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "sharded": self.sharded}
