"""Several GPUs of one host: CFG-parallel and Ulysses sequence-parallel over torch.distributed.

Launched with torchrun (one process per GPU; RANK, WORLD_SIZE, LOCAL_RANK from the environment),
or by `ditbake run --gpus N`, which re-launches itself under torchrun:

    torchrun --standalone --nproc-per-node 2 my_script.py    # my_script.py:
    session = ditbake.runtime.load(path, device="cuda", parallel="cfg")   # cuda:LOCAL_RANK
    result = session.generate(text_embeds, negative_embeds, seed=0)      # the same on every rank
    if session.is_writer: ...                                            # rank 0 writes outputs

NCCL on CUDA, gloo on the CPU. World = cfg × sp ranks: rank r is CFG group r // sp (0: cond,
1: uncond) and sequence rank r % sp inside it.

- **CFG-parallel** (`cfg`): each CFG group runs only its branch's forwards, keeping that branch's
  Δ and head caches (the plan already separates them per branch); one all-gather of the model
  outputs per step across the groups feeds the guidance combine, which every rank computes
  identically, so the latents never diverge. Any backend (whole forwards per rank).
- **Ulysses** (`ulysses`): the visual tokens are split along the sequence; every token-wise op
  (norms, linears, FFN, cross-attention to the full text, the rope tables sliced to the shard)
  runs on the shard; around each self-attention one all-to-all turns [B, H, S/N, D] into
  [B, H/N, S, D] and one turns the output back. Each rank runs its heads with their planned
  schemes (local3d permutes the full sequence after the all-to-all, so it composes; cached heads
  are cached by the rank that owns them); heads are assigned so that heads with the same scheme
  history share a rank. Δ caches hold the rank's shard (skipping is elementwise). Eager backend
  and Wan only: a compiled block engine cannot contain a collective, and the joint text+visual
  sequence of CogVideoX/SD3/Flux would need the text kept whole on every rank.
- `cfg+ulysses`: both, e.g. 4 ranks = 2 CFG groups × 2 sequence ranks.

A step where one branch is skipped whole is served from its stack residual (one add and the
epilogue), and that group then waits for the other branch: lending it to the other branch would
move that branch's per-block Δ and head caches, sharded for its own group size, to a different
sharding for one step and back. Not done; the README says when it would pay.
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ditbake.runtime.errors import ParallelError
from ditbake.runtime.plan import BRANCHES, Plan
from ditbake.runtime.session import Session

log = logging.getLogger(__name__)

MODES = ("cfg", "ulysses", "cfg+ulysses")
# architectures whose blocks carry visual tokens only (text enters by cross-attention), so the
# sequence can be split without touching a text range
ULYSSES_ARCHITECTURES = ("wan",)
# NVLink multicast (NVLS) is kept off: these collectives do not need it, and on shared hosts a
# program using it can take the host's GPUs out of service (device README)
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@dataclass(frozen=True)
class Layout:
    """cfg CFG groups × sp sequence ranks; this rank's place in it."""

    cfg: int
    sp: int
    rank: int

    @property
    def cfg_rank(self) -> int:
        return self.rank // self.sp

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp

    @staticmethod
    def resolve(mode: str, world: int, rank: int) -> "Layout":
        if mode not in MODES:
            raise ParallelError(f"parallel mode {mode!r} is unknown; choose one of {MODES}")
        if world < 2:
            raise ParallelError(f"parallel={mode!r} needs at least 2 processes, this run has {world}; launch with "
                                "`torchrun --nproc-per-node N` or `ditbake run --gpus N`")
        if mode == "cfg":
            if world != 2:
                raise ParallelError(f"parallel='cfg' splits the 2 CFG branches over 2 processes, this run has {world}; "
                                    "use 'cfg+ulysses' for more")
            return Layout(2, 1, rank)
        if mode == "ulysses":
            return Layout(1, world, rank)
        if world % 2 or world < 4:
            raise ParallelError(f"parallel='cfg+ulysses' needs an even number ≥ 4 of processes, this run has {world}")
        return Layout(2, world // 2, rank)


def default_mode(world: int, guidance_scale: float) -> str:
    """CFG-parallel needs no communication inside a forward, so it goes first where CFG is on."""
    if guidance_scale <= 1.0:
        return "ulysses"
    return "cfg" if world == 2 else "cfg+ulysses" if world % 2 == 0 else "ulysses"


def init_process_group(device: torch.device) -> torch.device:
    """Join the torchrun job (NCCL on CUDA, gloo on CPU); return this rank's device."""
    if not dist.is_available():
        raise ParallelError("this torch build has no torch.distributed; install a build with it")
    if not dist.is_initialized() and ("WORLD_SIZE" not in os.environ or "RANK" not in os.environ):
        raise ParallelError("a parallel session runs one process per GPU under torchrun; launch with "
                            "`torchrun --standalone --nproc-per-node N ...` or `ditbake run --gpus N`")
    if device.type == "cuda":  # this rank's GPU first, so NCCL binds its communicators to it
        local = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
        if local >= torch.cuda.device_count():
            raise ParallelError(f"local rank {local} has no GPU ({torch.cuda.device_count()} visible); "
                                "launch at most one process per GPU")
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    if not dist.is_initialized():
        # importing torch._dynamo once a group exists leaves references to it in a cache there, so
        # destroy_process_group cannot free it and gloo's worker threads outlive the interpreter,
        # which aborts at exit ("terminate called without an active exception"); import it first
        import torch._dynamo  # noqa: F401, PLC0415

        os.environ.update(NCCL_ENV)
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return device


def launch_command(nproc: int, module_args: list[str]) -> tuple[list[str], dict[str, str]]:
    """The torchrun command (and environment) that runs `python -m <module_args>` on nproc ranks."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", *module_args]
    return cmd, {**os.environ, **NCCL_ENV, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def head_assignment(plan: Plan, sp: int) -> dict[tuple[int, str], tuple[int, ...]]:
    """Per (block, site): the heads in rank order (rank s gets entries [s·H/sp, (s+1)·H/sp)).

    Heads are sorted by their scheme history over all steps and branches, so heads planned alike
    (all full, or the same sparse kinds at the same steps) share a rank: a rank whose heads are
    all full runs dense SDPA, and one op call serves one kind of work. The order is fixed for the
    whole generation because a cached head's output lives on the rank that computed it."""
    order = {}
    for b in range(plan.num_blocks):
        for site, n in plan.attention_sites:
            history = [[] for _ in range(n)]
            for i in range(plan.num_steps):
                for branch in BRANCHES:
                    variant = plan.variants[plan.step_ids(i, branch)[b]]
                    schemes = variant.head_map.get(site) if variant.compute else None
                    for h in range(n):
                        history[h].append(schemes[h].kind if schemes else "full")
            order[b, site] = tuple(sorted(range(n), key=lambda h: (history[h], h)))
    return order


class UlyssesAttention:
    """The attention runner a sequence-parallel block sees: all-to-all heads ↔ sequence around the
    session's AttentionRunner, which runs this rank's heads on the full sequence."""

    def __init__(self, inner, group, sp: int, rank: int, orders: dict):
        self.inner, self.group, self.sp, self.rank = inner, group, sp, rank
        self._orders = orders  # (block, site) → (order, perm, inverse, identity); see SequenceShardedEngines

    def account(self, *args, **kwargs):
        return self.inner.account(*args, **kwargs)

    def __call__(self, key, q, k, v, schemes, text_range, grid=None):
        if text_range[1] > text_range[0]:
            raise ParallelError(f"attention site {key} has text tokens in its sequence; Ulysses here splits visual "
                                "tokens only")
        order, perm, inverse, identity = self._orders[key[1], key[2]]
        b, n, s_local, d = q.shape
        h = n // self.sp
        # one all-to-all for the three: send[j] holds q, k, v of the heads rank j runs, so each
        # tensor is copied once; rank j's sequence chunk of this rank's heads comes back in recv[j]
        send = q.new_empty(self.sp, 3, b, h, s_local, d)
        for i, t in enumerate((q, k, v)):
            t = t if identity else t.index_select(1, perm)
            send[:, i].copy_(t.unflatten(1, (self.sp, h)).transpose(0, 1))
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=_process_group(self.group))
        q, k, v = recv.permute(1, 2, 3, 0, 4, 5).reshape(3, b, h, self.sp * s_local, d).unbind(0)
        mine = tuple(schemes[i] for i in order[self.rank * h:(self.rank + 1) * h]) if schemes else schemes
        out = self.inner(key, q, k, v, mine, text_range, grid)
        # [B, h, S, D] → sequence chunk j goes back to rank j; its heads come back from every rank
        send = out.unflatten(2, (self.sp, s_local)).permute(2, 0, 1, 3, 4).contiguous()
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=_process_group(self.group))
        out = recv.permute(1, 0, 2, 3, 4).reshape(b, n, s_local, d)
        return out if identity else out.index_select(1, inverse)


class SequenceShardedEngines:
    """Engines of a sequence-parallel rank: the prologue runs on the whole latents and keeps this
    rank's token shard (and rope rows); blocks run on the shard with Ulysses attention; the shards
    are gathered before the epilogue (unpatchify needs every token)."""

    def __init__(self, inner, group, sp: int, rank: int, orders: dict, device):
        self.inner, self.group, self.sp, self.rank = inner, group, sp, rank
        self.name = inner.name
        self._orders = {}
        for key, order in orders.items():
            perm = torch.tensor(order, device=device)
            self._orders[key] = (order, perm, torch.argsort(perm), list(order) == sorted(order))
        self._wrapped: UlyssesAttention | None = None

    def _shard(self, t: torch.Tensor) -> torch.Tensor:
        s = t.shape[1]
        if s % self.sp:
            raise ParallelError(f"{s} visual tokens do not split over {self.sp} sequence ranks; choose a shape "
                                f"whose token count (frames × height × width after patching) divides by {self.sp}")
        n = s // self.sp
        return t.narrow(1, self.rank * n, n).contiguous()

    def prologue(self, x, t, text, profile, extras=()):
        h, ctx = self.inner.prologue(x, t, text, profile, extras)
        cos, sin = ctx["rope"]
        return self._shard(h), {**ctx, "rope": (self._shard(cos), self._shard(sin))}

    def block(self, vid, variant, index, h, ctx, attention, branch):
        if self._wrapped is None or self._wrapped.inner is not attention:  # one per generation's runner
            self._wrapped = UlyssesAttention(attention, self.group, self.sp, self.rank, self._orders)
        return self.inner.block(vid, variant, index, h, ctx, self._wrapped, branch)

    def epilogue(self, h, ctx):
        parts = [torch.empty_like(h) for _ in range(self.sp)]
        dist.all_gather(parts, h.contiguous(), group=_process_group(self.group))
        return self.inner.epilogue(torch.cat(parts, dim=1), ctx)


# Subgroups by their ranks, created once per process group and shared by every session. Sessions
# hold rank tuples, not groups: a Python reference to a group keeps it (and gloo's worker threads)
# alive past shutdown(), and a thread still releasing tensors when the interpreter exits aborts it.
_SUBGROUPS: dict[tuple[int, ...], object] = {}


def _process_group(ranks: tuple[int, ...]):
    """The group of these ranks for a collective's `group=`: None (the default group) for the whole world."""
    if not dist.is_initialized() or (len(ranks) < dist.get_world_size() and ranks not in _SUBGROUPS):
        raise ParallelError("this parallel session's job has been shut down (distributed.shutdown()); a session "
                            "cannot be used after it, start a new job")
    return _SUBGROUPS.get(ranks)


def _groups(layout: Layout) -> tuple[tuple[int, ...] | None, tuple[int, ...] | None]:
    """(CFG group, sequence group) of this rank as rank tuples; None where the group would be this rank
    alone. Every rank creates every subgroup in the same order (torch.distributed requires it)."""
    world = layout.cfg * layout.sp
    mine = [None, None]
    sp_groups = [tuple(c * layout.sp + s for s in range(layout.sp)) for c in range(layout.cfg)]
    cfg_groups = [tuple(c * layout.sp + s for c in range(layout.cfg)) for s in range(layout.sp)]
    for slot, groups in ((0, cfg_groups), (1, sp_groups)):
        for ranks in groups:
            if len(ranks) == 1:
                continue
            if len(ranks) < world and ranks not in _SUBGROUPS:
                _SUBGROUPS[ranks] = dist.new_group(list(ranks))
            if layout.rank in ranks:
                mine[slot] = ranks
    return mine[0], mine[1]


class ParallelSession(Session):
    """A Session on one rank of a torchrun job; see the module docstring. Build it with
    `ditbake.runtime.load(path, device=..., parallel="cfg" | "ulysses" | "cfg+ulysses")`."""

    def __init__(self, artifact, device, dtype, cuda_graphs=None, parallel: str = "cfg"):
        self.layout = Layout.resolve(parallel, dist.get_world_size(), dist.get_rank())
        self.mode = parallel
        if self.layout.sp > 1:
            _check_ulysses(artifact, self.layout.sp)
        if self.layout.cfg > 1 and artifact.plan.uncond_skip == "guidance":
            raise ParallelError("this plan's skipped uncond steps reuse cond's residual of the same step "
                                "(uncond_skip 'guidance'), and CFG-parallel runs the branches on different ranks; "
                                "use parallel='ulysses' or a plan without guidance skips")
        super().__init__(artifact, device, dtype, cuda_graphs=cuda_graphs)
        self.cfg_group, self.sp_group = _groups(self.layout)
        if self.layout.sp > 1:
            self.engines = SequenceShardedEngines(self.engines, self.sp_group, self.layout.sp, self.layout.sp_rank,
                                                  head_assignment(self.plan, self.layout.sp), self.device)
        self._split = False

    @property
    def is_writer(self) -> bool:
        """Rank 0 writes outputs; every rank holds the same latents."""
        return self.layout.rank == 0

    def _local_branches(self, branches):
        self._split = self.layout.cfg > 1 and len(branches) > 1
        if self.layout.cfg > 1 and not self._split:
            log.warning("guidance is off: both CFG groups run the cond branch; parallel='ulysses' would use them")
        return [branches[self.layout.cfg_rank]] if self._split else branches

    def _share_outputs(self, outputs: dict) -> dict:
        if not self._split:
            return outputs
        (out,) = outputs.values()
        parts = [torch.empty_like(out) for _ in range(self.layout.cfg)]
        dist.all_gather(parts, out.contiguous(), group=_process_group(self.cfg_group))
        return dict(zip(BRANCHES, parts))

    def generate(self, *args, **kwargs):
        result = super().generate(*args, **kwargs)
        # the report covers the whole job: blocks of both branches, attention of every rank's heads
        r = result.report
        counts = torch.tensor([r.block_computes, r.block_skips], dtype=torch.float64, device=self.device)
        flops = torch.tensor([r.attention_flops_done, r.attention_flops_dense], dtype=torch.float64,
                             device=self.device)
        if self._split:
            dist.all_reduce(counts, group=_process_group(self.cfg_group))
            dist.all_reduce(flops)
        elif self.layout.sp > 1:
            dist.all_reduce(flops, group=_process_group(self.sp_group))
        r.block_computes, r.block_skips = (int(c) for c in counts.tolist())
        r.attention_flops_done, r.attention_flops_dense = flops.tolist()
        return result


def _check_ulysses(artifact, sp: int) -> None:
    arch = artifact.architecture
    if arch not in ULYSSES_ARCHITECTURES:
        raise ParallelError(f"Ulysses sequence parallelism runs {ULYSSES_ARCHITECTURES} so far; {arch!r} attends over "
                            "a joint text+visual sequence (the text would have to stay whole on every rank); "
                            "use parallel='cfg'")
    backend = artifact.manifest.get("backend", "eager")
    if backend != "eager":
        raise ParallelError(f"Ulysses needs the eager backend: a compiled {backend} block engine contains the "
                            "attention, and the all-to-all must sit between engines; rebuild with "
                            "`--backend eager` or use parallel='cfg'")
    if artifact.plan.mode != "baked":
        raise ParallelError("Ulysses runs baked plans: adaptive measurements on sequence shards would differ per "
                            "rank; re-plan with --mode baked or use parallel='cfg'")
    heads = int(artifact.config["num_attention_heads"])
    if heads % sp:
        raise ParallelError(f"{heads} attention heads do not split over {sp} sequence ranks; use a rank count that "
                            "divides the heads")


def shutdown() -> None:
    """Leave the job: every group is destroyed and, with no session holding one, freed (its threads joined)."""
    _SUBGROUPS.clear()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def cli_launch(gpus: int, mode: str | None, guidance_scale: float, device: str) -> tuple[str | None, bool]:
    """For `ditbake run --gpus N [--parallel M]`: (this process's parallel mode or None, whether to
    re-launch under torchrun first). Checks what can be checked before processes start, so that
    such errors keep their exit code (torchrun reports any failed rank as 1)."""
    world = os.environ.get("WORLD_SIZE")
    if world is not None and int(world) > 1:  # already a rank of a torchrun job
        if gpus not in (1, int(world)):
            raise ParallelError(f"--gpus {gpus} but torchrun started {world} processes; pass one or the other")
        return mode or default_mode(int(world), guidance_scale), False
    if gpus < 1:
        raise ParallelError(f"--gpus must be at least 1, got {gpus}")
    if gpus == 1:
        if mode:
            raise ParallelError(f"--parallel {mode} needs --gpus N with N ≥ 2")
        return None, False
    Layout.resolve(mode or default_mode(gpus, guidance_scale), gpus, 0)
    if torch.device(device).type == "cuda" and torch.cuda.device_count() < gpus:
        raise ParallelError(f"--gpus {gpus} but {torch.cuda.device_count()} CUDA GPUs are visible")
    return mode or default_mode(gpus, guidance_scale), True


def relaunch(nproc: int, module_args: list[str]) -> int:
    """Run `python -m <module_args>` on nproc ranks under torchrun; its exit status (1 when a rank failed)."""
    import subprocess  # noqa: PLC0415

    cmd, env = launch_command(nproc, module_args)
    log.info("launching %d processes: %s", nproc, " ".join(cmd))
    rc = subprocess.run(cmd, env=env, check=False).returncode
    if rc:
        log.error("a rank failed (torchrun exit status %d); its error is logged above", rc)
    return ParallelError.exit_code if rc == 1 else rc
