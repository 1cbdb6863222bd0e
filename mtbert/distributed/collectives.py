"""The one module that calls ``torch.distributed``.

Every collective in mtbert goes through a ``Collectives`` object bound to the device the
process group serves (the run device: ``accelerator.device``). NCCL takes CUDA tensors only,
gloo CPU tensors, so a tensor on any other device is a bug that would only show on the first
multi-GPU run: ``Collectives`` refuses it with a message instead (``CollectiveDeviceError``).
Choice: one process group per run (Accelerate's: NCCL on GPUs, gloo on CPU), not a mixed
``cpu:gloo,cuda:nccl`` group; small host values (flags, fingerprints) are moved to the run
device before they are reduced. (The stop signal uses Accelerate's own trigger,
``set_trigger``/``check_trigger``, which reduces on the run device itself.)

``ops`` is the backend (``torch.distributed`` by default); tests pass a recorder with the
same four functions and a ``meta`` run device to prove what every collective receives
without a process group (tests/test_collectives.py).
"""

from __future__ import annotations

import torch

BUCKET = 1 << 24  # elements per all-reduce call (64 MiB of fp32)


class Pending:
    """Collectives in flight: ``wait()`` completes them, then runs ``then`` (e.g. the mean's division)."""

    def __init__(self, works: list, then):
        self.works, self.then = works, then

    def wait(self) -> None:
        for w in self.works:
            w.wait()
        if self.then is not None:
            self.then()
        self.works, self.then = [], None


class CollectiveDeviceError(AssertionError):
    """A tensor handed to a collective is not on the device the process group serves."""


class Collectives:
    def __init__(self, world: int, device, ops=None, rank: int = 0):
        self.world, self.rank = world, rank
        self.device = torch.device(device)
        if ops is None and world > 1:
            import torch.distributed as ops
        self.ops = ops

    # -- the guard -------------------------------------------------------------------------
    def _check(self, name: str, *tensors: torch.Tensor) -> None:
        for t in tensors:
            if t.device.type != self.device.type:
                raise CollectiveDeviceError(
                    f"{name}: tensor on {t.device}, but the process group serves {self.device} "
                    f"(NCCL takes CUDA tensors only); move it with .to(collectives.device)")

    # -- tensors ---------------------------------------------------------------------------
    # Each tensor collective starts asynchronously and returns a ``Pending``: the per-task path
    # launches task k's reduction right after task k's backward, so it runs while the next task
    # computes, and waits only before the Gram matrix (step.py). The results are those of the
    # synchronous calls: the same collectives on the same tensors, only the waiting moves.
    def all_reduce_mean(self, t: torch.Tensor) -> Pending:
        """t <- mean of t over ranks, in place, in flat buckets (t must be contiguous)."""
        if self.world == 1:
            return Pending([], None)
        self._check("all_reduce", t)
        flat = t.view(-1)
        works = [self.ops.all_reduce(flat[s:s + BUCKET], async_op=True) for s in range(0, flat.numel(), BUCKET)]
        return Pending(works, lambda: t.div_(self.world))

    def all_reduce_mean_(self, t: torch.Tensor) -> None:
        self.all_reduce_mean(t).wait()

    def all_reduce_sum_(self, t: torch.Tensor) -> None:
        if self.world == 1:
            return
        self._check("all_reduce", t)
        self.ops.all_reduce(t)

    def reduce_scatter_mean(self, out: torch.Tensor, inp: torch.Tensor) -> Pending:
        """out [n] <- this rank's n-column block of the mean of inp [n * world] over ranks.
        ``inp`` may be overwritten: on gloo (CPU) this is an all-reduce of ``inp`` and a copy of
        this rank's block — gloo's reduce_scatter_tensor took 2.6x the time of an all-reduce of
        the same tensor (0.61 vs 0.24 s for 3 x 22.6M floats on 2 ranks, 2026-12-02), although
        it moves half the bytes; NCCL's is the ring reduce-scatter."""
        self._check("reduce_scatter", out, inp)
        if self.device.type == "cpu":
            n = out.numel()
            works = [self.ops.all_reduce(inp, async_op=True)]
            return Pending(works, lambda: torch.div(inp[self.rank * n:(self.rank + 1) * n], self.world, out=out))
        return Pending([self.ops.reduce_scatter_tensor(out, inp, async_op=True)], lambda: out.div_(self.world))

    def all_gather_into(self, out: torch.Tensor, local: torch.Tensor) -> None:
        """out [world * n] <- every rank's local [n], in rank order."""
        self._check("all_gather", out, local)
        self.ops.all_gather_into_tensor(out, local)

    # -- host values (moved to the run device first) ----------------------------------------
    def all_equal(self, value: torch.Tensor) -> bool:
        """True if ``value`` (a small tensor) is bit-identical on every rank."""
        if self.world == 1:
            return True
        mine = value.to(self.device).reshape(-1)
        everyone = torch.empty(self.world * mine.numel(), dtype=mine.dtype, device=self.device)
        self.all_gather_into(everyone, mine)
        rows = everyone.view(self.world, -1).cpu()
        return all(torch.equal(rows[0], r) for r in rows)

    def gather_objects(self, obj) -> list:
        """Every rank's picklable ``obj``, in rank order. torch moves the pickled bytes to the
        current CUDA device itself under NCCL (Accelerate sets it); gloo keeps them on CPU."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        self.ops.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            self.ops.barrier()

    # -- process group and mesh outside Accelerate (FSDP2 step tests, bench_dist) -------------
    @classmethod
    def from_env(cls, device: str = "cpu") -> Collectives:
        """Join the process group torchrun describes (gloo on CPU, NCCL on CUDA)."""
        import torch.distributed as dist
        dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo")
        return cls(dist.get_world_size(), device, rank=dist.get_rank())

    def device_mesh(self):
        """A 1-D mesh over every rank on the run device: FSDP2's collectives then take tensors
        on the device the process group serves, as every collective here must."""
        from torch.distributed.device_mesh import init_device_mesh
        return init_device_mesh(self.device.type, (self.world,))

    def close(self) -> None:
        self.barrier()
        if self.world > 1:
            self.ops.destroy_process_group()


def process_group_exists() -> bool:
    """Whether this process joined a process group (DeepSpeed makes one for a single process too):
    such a process ends with ``process.leave`` after the group is destroyed."""
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized()


def destroy_process_group() -> None:
    """Leave this process's group, if it has one (local: no collective)."""
    if process_group_exists():
        import torch.distributed as dist
        dist.destroy_process_group()
