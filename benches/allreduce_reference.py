"""The reference side of benches/allreduce.rs: torch.distributed all_reduce (SUM) with the gloo backend on
CPU float32 tensors, timed the same way as ferrotune's ring.

  RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=P allreduce_reference.py SIZES_MB ITERS

For each size (comma-separated MB): one untimed all-reduce, then ITERS timed ones; rank 0 prints one JSON
object {size_mb: seconds per all-reduce}. The result is checked (every element equals the sum of ranks'
values) so both sides do the same work.
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
    out = {}
    for mb in [int(s) for s in sizes.split(",")]:
        t = torch.full((mb * (1 << 20) // 4,), float(rank + 1))
        dist.all_reduce(t)
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(int(iters)):
            dist.all_reduce(t)
        secs = (time.perf_counter() - t0) / int(iters)
        expected = float(world * (world + 1) // 2) * world ** int(iters)
        assert abs(t[0].item() - expected) <= 1e-3 * expected, (t[0].item(), expected)
        out[str(mb)] = secs
    if rank == 0:
        print(json.dumps(out))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
