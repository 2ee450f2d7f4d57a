"""A multi-process launch (``accelerate launch --multi_gpu --num_processes N``, ``torchrun
--nproc_per_node N``, several nodes): its ranks, a gloo group for the encode stage, and how the
Pipeline runs under it: rank 0 makes the corpus, every rank encodes its shards
(ace/pipeline/encode_stage.py), rank 0 merges them and runs the other stages as a process of its own.
"""
from __future__ import annotations

import os


class LaunchError(ValueError):
    """The launcher's environment is unusable; the message names the variables."""


def pick_gpu(index: int) -> None:
    """Process ``index`` uses GPU index % count ("cuda" then means that GPU); nothing on a CPU machine."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(index % torch.cuda.device_count())


class Launch:
    """The ranks of ``accelerate launch --multi_gpu`` / ``torchrun`` (RANK, WORLD_SIZE, LOCAL_RANK in the
    environment; one process when WORLD_SIZE is unset or 1). ``start`` joins a gloo process group for
    the encode stage; ``leave`` quits it and drops the launch variables, so that the stages after encode
    run in rank 0 alone as one process (their Accelerator sees no launch)."""

    ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE",
           "GROUP_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT",
           "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE", "TORCH_NCCL_ASYNC_ERROR_HANDLING")

    def __init__(self, environ=None):
        env = os.environ if environ is None else environ
        try:
            self.world = int(env.get("WORLD_SIZE") or 1)
            self.rank = int(env.get("RANK") or 0) if self.world > 1 else 0
            self.local_rank = int(env.get("LOCAL_RANK") or 0) if self.world > 1 else 0
        except ValueError:
            raise LaunchError(f"the launcher set RANK/WORLD_SIZE/LOCAL_RANK to non-integers: "
                              f"{env.get('RANK')!r}/{env.get('WORLD_SIZE')!r}/{env.get('LOCAL_RANK')!r}") from None
        self.group = False
        self.told = False

    def start(self, hours: float = 24.0) -> None:
        import datetime

        import torch.distributed as dist

        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("gloo", timeout=datetime.timedelta(hours=hours))
            self.group = True
            pick_gpu(self.local_rank)

    def tell(self, message: dict) -> None:
        """Rank 0, once: what the other ranks do next ({"plan": digest} | {"done": True} | {"error": text})."""
        import torch.distributed as dist

        if not self.told:
            self.told = True
            dist.broadcast_object_list([message], src=0)

    def hear(self) -> dict:
        """A rank > 0: rank 0's ``tell`` (waits for it)."""
        import torch.distributed as dist

        box = [None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def leave(self) -> None:
        import torch.distributed as dist

        if self.group and dist.is_initialized():
            dist.destroy_process_group()
        self.group = False
        for k in self.ENV:
            os.environ.pop(k, None)
        self.world, self.rank = 1, 0




def run_launched(pipeline, until: str) -> bool:
    """``pipeline.run_all`` under a launch: rank 0 runs the corpus stage, every rank the encode stage
    (``pipeline.stage_encode``: rank 0 plans and merges, the others follow). True in rank 0, which then
    runs the other stages as a process of its own; the other ranks end here."""
    launch = pipeline.launch
    world = launch.world
    launch.start()
    try:
        if launch.rank > 0:
            pipeline.keys["corpus"] = pipeline.corpus_key()
            pipeline.stage_encode()
            print(f"[encode] rank {launch.rank} of {world}: done; rank 0 runs the other stages")
            return False
        error = None
        try:
            pipeline.save_config()
            pipeline.stage_corpus()
            if until != "corpus":
                pipeline.stage_encode()
        except BaseException as exc:
            error = exc
            raise
        finally:  # the other ranks wait for this word when rank 0 had no plan to tell them
            launch.tell({"error": str(error) or type(error).__name__} if error is not None else {"done": True})
    finally:
        launch.leave()
    print(f"[encode] left the launch of {world} processes: the other stages run in rank 0 alone")
    return True
