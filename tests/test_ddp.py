"""A two-process DDP training step (gloo, CPU) through the crossattn modules."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from crossattn.nn import BidirectionalCrossAttention


def _step(rank: int, world: int, init_file: str, out_dir: str):
    os.environ.pop("CROSSATTN_BACKEND", None)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)  # identical initial weights on both ranks
    model = DistributedDataParallel(BidirectionalCrossAttention(16, 2, learnable_temperature=True))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(100 + rank)  # different data per rank
    text, audio = torch.randn(2, 5, 16, generator=g), torch.randn(2, 9, 16, generator=g)
    audio_mask = torch.ones(2, 9, dtype=torch.long)
    audio_mask[rank, 6:] = 0
    t_att, a_att, w_ta, _ = model(text, audio, audio_mask=audio_mask, need_weights="mean")
    (t_att.square().mean() + a_att.square().mean() - (w_ta * w_ta.clamp_min(1e-9).log()).sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.module.named_parameters()}
    opt.step()
    torch.save({"grads": grads, "params": model.module.state_dict()}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_process_ddp_step(tmp_path):
    init_file = str(tmp_path / "init")
    mp.spawn(_step, args=(2, init_file, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for name, g in r0["grads"].items():
        torch.testing.assert_close(g, r1["grads"][name])  # all-reduced
    assert r0["grads"]["temperature.log_temperature"].abs().sum() > 0
    for name, p in r0["params"].items():
        torch.testing.assert_close(p, r1["params"][name])
