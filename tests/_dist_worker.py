"""Run by tests/test_distributed.py in a subprocess: the same LoRA training on one process and on two (gloo),
with DDP and with FSDP2 (fully_shard), every LoRA Linear fused. Writes the per-step losses as JSON.

    python tests/_dist_worker.py OUT.json
"""

from __future__ import annotations

import json
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

STEPS = 6
WORLD = 2


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.up = nn.Linear(width, 2 * width + 1)
        self.down = nn.Linear(2 * width + 1, width)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(12), Block(12)])
        self.head = nn.Linear(12, 3, bias=False)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def build_model():
    from peft import LoraConfig, get_peft_model

    from fused_lora.integrations.peft import patch_model

    torch.manual_seed(0)
    model = get_peft_model(
        Net(), LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down", "head"], init_lora_weights=False)
    )
    assert patch_model(model) == 5
    return model


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 12, generator=g), torch.randn(8, 3, generator=g)


def count_fused_calls():
    import fused_lora

    calls = []  # every fused layer call reaches the op boundary's eager entry (fused_lora/plan.py -> ops.forward)
    original = fused_lora.ops.forward
    fused_lora.ops.forward = lambda *a, **k: calls.append(1) or original(*a, **k)
    return calls


def train(model, x, y, reduce_loss):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(STEPS):
        loss = (model(x) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(reduce_loss(loss.detach()))
    return losses


def run_rank(rank, port, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    calls = count_fused_calls()
    x, y = data()
    rows = slice(rank * 4, rank * 4 + 4)

    def global_mean(loss):
        dist.all_reduce(loss)
        return loss.item() / WORLD

    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(build_model())
    result = {"ddp": train(ddp, x[rows], y[rows], global_mean)}

    from torch.distributed.fsdp import fully_shard

    model = build_model()
    for block in model.base_model.model.blocks:
        fully_shard(block)
    fully_shard(model)
    result["fsdp2"] = train(model, x[rows], y[rows], global_mean)
    result["fused_calls"] = len(calls)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(out_path):
    torch.set_num_threads(1)
    import peft  # noqa: F401  imported once here: forked ranks inherit it (importing peft costs seconds)

    import fused_lora.integrations.peft  # noqa: F401

    # fork before this process runs any op, so no thread pool or lock state is copied into the ranks
    mp.start_processes(run_rank, args=(free_port(), out_path), nprocs=WORLD, join=True, start_method="fork")
    with open(out_path) as f:
        result = json.load(f)
    calls = count_fused_calls()
    x, y = data()
    single = train(build_model(), x, y, lambda loss: loss.item())
    single_calls = len(calls)
    result.update(single=single, single_fused_calls=single_calls)
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
