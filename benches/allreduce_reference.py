"""The reference side of benches/allreduce.rs: torch.distributed all_reduce (SUM), reduce_scatter (SUM) and
all_gather with the gloo backend on CPU float32 tensors, timed the same way as ferrotune's ring. A buffer
of S MB is the all-reduce's tensor, the reduce-scatter's input and the all-gather's output.

  RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=P allreduce_reference.py SIZES_MB ITERS

For each size (comma-separated MB) and collective: one untimed call, then ITERS timed ones; rank 0 prints
one JSON object {collective: {size_mb: seconds per call}}. The results are checked so both sides do the
same work.
"""

import json
import os
import sys
import time

import torch
import torch.distributed as dist


def main(sizes, iters):
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    out = {"all_reduce": {}, "reduce_scatter": {}, "all_gather": {}}
    for mb in [int(s) for s in sizes.split(",")]:
        n = mb * (1 << 20) // 4
        full = torch.full((n,), float(rank + 1))
        part = torch.full((n // world,), float(rank + 1))
        ops = {
            "all_reduce": lambda: dist.all_reduce(full),
            "reduce_scatter": lambda: reduce_scatter(part, full),
            "all_gather": lambda: all_gather(full, part),
        }
        for name, op in ops.items():
            op()
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(int(iters)):
                op()
            out[name][str(mb)] = (time.perf_counter() - t0) / int(iters)
            if name == "reduce_scatter":
                assert part[0].item() == float(world * (world + 1) // 2), part[0].item()
            if name == "all_gather":
                assert full[0].item() == 1.0 and full[-1].item() == float(world), (full[0].item(), full[-1].item())
            part.fill_(float(rank + 1))
            full.fill_(float(rank + 1))
    if rank == 0:
        print(json.dumps(out))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
