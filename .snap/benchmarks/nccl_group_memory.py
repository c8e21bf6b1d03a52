"""What a second NCCL communicator costs each GPU (why `distributed.join` makes the default group
high-priority instead of `flow_group` adding one): free device memory before and after a second
group over the same ranks has run one 64 MB all-reduce. Under torchrun, one line of JSON per rank.

    torchrun --nproc-per-node 2 benchmarks/nccl_group_memory.py --out $OUT/nccl_group_memory.json
"""

import argparse
import datetime
import json
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, ".")
from engine import distributed  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="JSON of every rank's line (written by rank 0)")
    args = ap.parse_args()
    ranks, dev = distributed.join("cuda")
    x = torch.ones(16 << 20, device=dev)
    dist.all_reduce(x)  # the default group connected and used for a 64 MB all-reduce
    torch.cuda.synchronize()
    free0 = torch.cuda.mem_get_info()[0]
    group = dist.new_group(
        backend="nccl",
        pg_options=distributed._high_priority_options(),
        timeout=datetime.timedelta(seconds=distributed.timeout_s()),
    )
    dist.all_reduce(x, group=group)
    torch.cuda.synchronize()
    free1 = torch.cuda.mem_get_info()[0]
    out = {
        "rank": ranks.rank,
        "device": torch.cuda.get_device_name(),
        "second_group_MiB": (free0 - free1) / 2**20,
        "default_group_high_priority": distributed._default_is_high_priority(),
    }
    print(json.dumps(out), flush=True)
    every = [None] * ranks.world
    dist.all_gather_object(every, out)
    if ranks.is_main and args.out:
        info = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__}
        with open(args.out, "w") as f:
            json.dump({**info, "ranks": every}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
