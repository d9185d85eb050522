"""One rank of the distributed DP-SGD test (tests/test_privacy.py): three steps on the
stand-in model; `run` alone is the single-process reference."""

import sys

import torch
import torch.distributed as dist

from dpdm import privacy
from standin import standin_batch, standin_loss, standin_model


def run(out_path):
    model = standin_model()
    data = standin_batch(40, k=2, seed=4, scale=3.0)
    dp = privacy.DPSGD(standin_loss, noise_multiplier=1.5, max_grad_norm=0.3, num_examples=40,
                       sample_rate=0.3, dp_seed=6, physical_batch_size=4,
                       optimizer=torch.optim.Adam(model.parameters(), lr=1e-2))
    stats = []
    for _ in range(3):
        idx = dp.poisson_batch()
        stats.append(dp.step(model, tuple(t[idx] for t in data)))
    secret = privacy.DPSGD(standin_loss, noise_multiplier=1.0, max_grad_norm=1.0, num_examples=1000,
                           sample_rate=0.3)  # no dp_seed: rank 0's OS-entropy seed, broadcast
    torch.save({"params": [p.detach() for p in model.parameters()], "stats": stats,
                "noise_state": dp.noise_generator.get_state(), "history": dp.history,
                "secret_batches": [secret.poisson_batch() for _ in range(3)]}, out_path)


if __name__ == "__main__":
    rank, world, init = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    run(sys.argv[4])
    dist.barrier()
    dist.destroy_process_group()
