"""Checkpoint save and resume of a run's state, given as named parts, with the run's identity.

A **part** is anything with ``state_dict()`` / ``load_state_dict(state)`` (:class:`Stateful`):
the trainer itself (its step and evaluation history), the model, the EMA, the optimizer, the lr
schedule, the algorithm's state (bank, N̂), the trainer's get histogram ... (shared: every rank
holds the same, rank 0 writes it) and, apart, the **per-rank** parts (the reader's position, the
augmentation generator, the RNGs). Adding a piece of state to a run is adding one entry to one of
the two dicts handed to :class:`Checkpointer`; nothing here knows what the parts are.

- :meth:`Checkpointer.save` writes every part (every rank; sealed files, see :mod:`bmb.checkpoint`)
  and prunes this run's old checkpoints;
- :meth:`Checkpointer.start` has the run directory (:class:`bmb.rundir.RunDir`) decide, reading
  only, whether the run starts afresh or resumes and from which checkpoint (a refusal raises
  :class:`bmb.rundir.RunDirError` before anything in the run directory is written), loads that
  checkpoint into the parts, agrees on the run id, then (rank 0) records the start or resume.

File layout (format 2, unchanged by the parts): rank 0's file ``{"format", "run_id", "world_size",
"config", "dataset_build_id", <the inline part's keys: "step", "history">, <one key per shared
part>, "rank0": <rank 0's per-rank state>}``; every other rank's file ``{"run_id", <one key per
per-rank part>}``.

**DeepSpeed** (:class:`ZeroOptimizer`, the one adapter): ZeRO partitions the optimizer state, so
there it is a per-rank part whose load takes every rank's piece, and its shared slot stays empty.

**Another world size.** Under DDP every shared part is the same on every rank, and the readers'
position is one position in the global sample order (``pipelines.sampling``): a checkpoint written
by ``R`` processes resumes with ``R' != R`` exactly at the same global batch, every rank from rank
0's state. A per-rank part that cannot move says why (:meth:`ZeroOptimizer.refuse_move`,
:meth:`Reader.refuse_move`); the resume is then refused before anything is written.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from bmb import checkpoint as ckpt
from bmb import rundir
from bmb.guards import refuse_nonfinite_checkpoint
from bmb.rundir import RunDir, RunDirError


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> Any: ...


class Part:
    """A part made of two functions (for state that is not an object of its own: a tensor, a
    generator, the global RNG). ``template``: what a checkpoint is checked against, if not the state."""

    def __init__(self, get: Callable[[], Any], put: Callable[[Any], Any]) -> None:
        self.state_dict, self.load_state_dict = get, put


class Empty:
    """The slot of a part that lives on the other side (the optimizer under ZeRO / not under ZeRO)."""

    def state_dict(self) -> None:
        return None

    def load_state_dict(self, state: Any) -> None:
        pass

    def template(self) -> None:
        return None


class ZeroOptimizer:
    """DeepSpeed ZeRO's optimizer as a per-rank part: each rank saves its own partition; loading
    takes the list of every rank's partition (``gather``); it never moves to another world size.
    Its state holds a few of DeepSpeed's own classes, allow-listed by name for the safe load."""

    gather = True

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer

    def state_dict(self) -> Any:
        return self.optimizer.state_dict()

    def load_state_dict(self, parts: list[Any]) -> None:
        self.optimizer.load_state_dict(parts)

    def template(self) -> None:  # its layout is DeepSpeed's business
        return None

    def safe_globals(self) -> list[Any]:
        return ckpt.deepspeed_safe_globals()

    def refuse_move(self, state: Any, world: int, now: int) -> str:
        return (f"its DeepSpeed ZeRO optimizer state is partitioned over those {world} ranks (one part per rank "
                f"file) and is not re-partitioned for {now}: resume with {world} processes (DDP checkpoints "
                "resume at any world size)")


def optimizer_parts(optimizer: Any, deepspeed: bool) -> tuple[Any, Any]:
    """``(shared part, per-rank part)`` of the optimizer: itself and an empty slot, or under
    DeepSpeed ZeRO an empty slot and its partitions (:class:`ZeroOptimizer`)."""
    return (Empty(), ZeroOptimizer(optimizer)) if deepspeed else (optimizer, Empty())


class Reader:
    """The input stream as a per-rank part; it moves to another world size only when its state is
    a position in the global sample order (:func:`global_reader_position`)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def state_dict(self) -> Any:
        return self.stream.state_dict()

    def load_state_dict(self, state: Any) -> None:
        self.stream.load_state_dict(state)

    def template(self) -> None:  # not asked for its state just to check a checkpoint's keys
        return None

    def refuse_move(self, state: dict[str, Any], world: int, now: int) -> str | None:
        if global_reader_position(state):
            return None
        return (f"its reader state (backend {state.get('backend')!r}, order {state.get('order')!r}) is a position "
                f"per rank, which another number of processes cannot continue exactly: resume with {world} processes")


def global_reader_position(reader: dict[str, Any]) -> bool:
    """Whether a reader's state is a position in the global sample order (both streams'
    ``pipelines.sampling.IndexStream`` states, in an exact order), the same at any world size."""
    streams = [reader.get(name) for name in ("labeled", "unlabeled")]
    return (reader.get("order", "exact") in ("exact", "index")
            and all(isinstance(st, dict) and st.get("order") == "global" for st in streams))


def rng_parts(device: torch.device) -> dict[str, Part]:
    """The process's global RNGs as per-rank parts (the CUDA one None off CUDA)."""
    cuda = device.type == "cuda"

    def put_cuda(state: Any) -> None:
        if state is not None and cuda:
            torch.cuda.set_rng_state(state)

    return {"torch_rng": Part(torch.get_rng_state, torch.set_rng_state),
            "cuda_rng": Part(lambda: torch.cuda.get_rng_state() if cuda else None, put_cuda)}


def _template(part: Any) -> Any:
    return part.template() if hasattr(part, "template") else part.state_dict()


@dataclasses.dataclass
class Loaded:
    """One verified checkpoint, for this rank: the main file, this rank's file (None: rank 0's
    state, also at another world size) and the gathered parts' pieces of every rank."""

    main: dict[str, Any]
    mine: dict[str, Any] | None
    gathered: dict[str, list[Any]]


class Checkpointer:
    """Saves and restores a run's parts in its run directory.

    Args:
        parts: shared parts by name (the file's keys); the one named ``inline`` has its state's keys
            at the top level of the file and holds ``"step"``.
        rank_parts: per-rank parts by name.
        run: the run directory (:class:`bmb.rundir.RunDir`).
        coll: :class:`bmb.dist.Collectives` (rank, world size, agreement).
        barrier: waits for every rank (``accelerator.wait_for_everyone``).
        config: the run's config as a dict (stored in every checkpoint); ``keep``: checkpoints kept.
        dataset_build_id: the dataset's build id (stored; compared on resume).
    """

    def __init__(self, parts: dict[str, Stateful], rank_parts: dict[str, Stateful], run: RunDir, coll: Any,
                 barrier: Callable[[], Any], config: dict[str, Any], keep: int, dataset_build_id: str | None = None,
                 inline: str = "trainer", log: Callable[[str], None] = print) -> None:
        self.parts, self.rank_parts, self.run, self.coll = parts, rank_parts, run, coll
        self.barrier, self.config, self.keep, self.inline = barrier, config, keep, inline
        self.dataset_build_id, self.log = dataset_build_id, log
        self.run_id: str | None = None  # set by start(): a new id, or the resumed checkpoint's
        self.main = coll.rank == 0

    # ------------------------------------------------------------------ what a checkpoint holds
    def rank_state(self, template: bool = False) -> dict[str, Any]:
        """This rank's state; ``template``: the same keys, without asking the reader or DeepSpeed
        for their state (what a checkpoint is checked against before it is restored)."""
        get = _template if template else (lambda p: p.state_dict())
        return {"run_id": self.run_id, **{name: get(p) for name, p in self.rank_parts.items()}}

    def main_state(self, template: bool = False) -> dict[str, Any]:
        get = _template if template else (lambda p: p.state_dict())
        shared = {name: get(p) for name, p in self.parts.items() if name != self.inline}
        return {"format": ckpt.FORMAT, "run_id": self.run_id, **self.parts[self.inline].state_dict(),
                "world_size": self.coll.world_size, "config": None if template else self.config,
                **shared, "rank0": self.rank_state(template),
                # not in the template: checkpoints from before it are still resumed (not compared)
                **({} if template else {"dataset_build_id": self.dataset_build_id})}

    def _every_part(self) -> list[Any]:
        return [*self.parts.values(), *self.rank_parts.values()]

    def _safe_globals(self) -> list[Any]:
        return [g for p in self._every_part() if hasattr(p, "safe_globals") for g in p.safe_globals()]

    # ------------------------------------------------------------------ save
    def save(self) -> None:
        """All ranks call this; rank files first, then rank 0's main file (its presence = complete).
        Every file is sealed with its hash, this run's id and the step; pruning only ever removes
        this run's checkpoints."""
        folder, rank, world = self.run.ckpt_dir, self.coll.rank, self.coll.world_size
        step = self.parts[self.inline].state_dict()["step"]
        self.barrier()
        meta = {"run_id": self.run_id, "step": step}
        if rank > 0:
            ckpt.atomic_save(self.rank_state(), ckpt.rank_path(folder, step, rank), {**meta, "rank": rank})
        self.barrier()
        if self.main:
            ckpt.atomic_save(self.main_state(), ckpt.main_path(folder, step), {**meta, "world_size": world})
            ckpt.prune(folder, self.keep, self.run_id)
        self.barrier()

    # ------------------------------------------------------------------ load
    def _check_keys(self, name: str, got: Any, template: dict[str, Any], skip: tuple[str, ...]) -> None:
        """Raise :class:`ckpt.CheckpointError` naming every key of ``template`` (what this run
        saves now, nested dicts followed) that ``got`` lacks."""
        missing: list[str] = []

        def walk(tmpl: dict, g: Any, prefix: str) -> None:
            if not isinstance(g, dict):
                missing.append(f"{prefix.rstrip('.') or '<top level>'} (not a mapping)")
                return
            for k, v in tmpl.items():
                key = f"{prefix}{k}"
                if k not in g:
                    missing.append(key)
                elif isinstance(v, dict) and key not in skip:
                    walk(v, g[k], key + ".")

        walk(template, got, "")
        if missing:
            shown = ", ".join(missing[:8]) + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else "")
            raise ckpt.CheckpointError(f"{name} lacks key(s) {shown}")

    def load(self, path: Path, step: int | None = None, run_id: str | None = None) -> Loaded:
        """Verify and load one checkpoint for this rank. Raises :class:`ckpt.CheckpointError` on
        anything unusable, :class:`RunDirError` where it cannot move to this world size."""
        folder, rank, now = path.parent, self.coll.rank, self.coll.world_size
        main, seal = ckpt.load_verified(path, self._safe_globals())
        # "config" may predate keys added since (compared by value later); history rows vary.
        self._check_keys(path.name, main, self.main_state(template=True), ("config",))
        shared = {k: main[k] for k in self.parts if k != self.inline}
        refuse_nonfinite_checkpoint(path.name, shared)  # a diverged state: fall back, loudly
        if step is None:
            step = main["step"]
        if main["step"] != step or seal.get("step") != step:
            raise ckpt.CheckpointError(f"{path.name}: holds step {main['step']} (sealed as {seal.get('step')})")
        if main["run_id"] != seal.get("run_id") or (run_id is not None and main["run_id"] != run_id):
            raise ckpt.CheckpointError(f"{path.name}: written by run {main['run_id']} (sealed as "
                                       f"{seal.get('run_id')}), not by run {run_id}")
        world = main["world_size"]
        if world != now:
            self._check_portable(path, main)

        def rank_file(r: int) -> dict:
            rp = ckpt.rank_path(folder, step, r)
            if not rp.is_file():
                raise ckpt.CheckpointError(f"{path.name}: rank file {rp.name} missing")
            state, rseal = ckpt.load_verified(rp, self._safe_globals())
            self._check_keys(rp.name, state, self.rank_state(template=True), ())
            if {rseal.get("run_id"), state["run_id"]} != {main["run_id"]} or rseal.get("step") != step:
                raise ckpt.CheckpointError(f"{rp.name} belongs to run {state['run_id']} (sealed as "
                                           f"{rseal.get('run_id')}, step {rseal.get('step')})")
            return state

        for r in range(1, world):  # complete = every rank file present and sealed
            rp = ckpt.rank_path(folder, step, r)
            if not rp.is_file() or ckpt.read_seal(rp) is None:
                raise ckpt.CheckpointError(f"{path.name}: rank file {rp.name} missing or unsealed")
        # Another world size: every rank continues from rank 0's state (see the module docstring).
        mine = rank_file(rank) if 0 < rank and world == now else None
        gathered: dict[str, list[Any]] = {}
        names = [n for n, p in self.rank_parts.items() if getattr(p, "gather", False)]
        if names:  # every rank's piece of these (same world size: checked above)
            files = [main["rank0"]] + [mine if r == rank else rank_file(r) for r in range(1, world)]
            gathered = {n: [f[n] for f in files] for n in names}
        return Loaded(main, mine, gathered)

    def _check_portable(self, path: Path, main: dict) -> None:
        """Raise :class:`RunDirError` naming the cause unless the checkpoint ``main`` (written by
        another number of processes) can resume at this world size."""
        world, now = main["world_size"], self.coll.world_size
        for name, part in self.rank_parts.items():
            why = part.refuse_move(main["rank0"][name], world, now) if hasattr(part, "refuse_move") else None
            if why:
                raise RunDirError(f"run dir {self.run.path}: checkpoint {path.name} (step {main['step']}) was "
                                  f"written by {world} processes, this run has {now}; {why}")

    def load_newest(self, candidates: list[tuple[int, Path]], run_id: str) -> tuple[Path, Loaded] | None:
        """Newest of this run's checkpoints that every rank can load; the others are skipped loudly."""
        for step, path in reversed(candidates):
            err: Exception | None = None
            try:
                found = self.load(path, step, run_id)
            except ckpt.CheckpointError as e:
                err = e
            if self.coll.any_true(err is not None):  # all ranks move on together
                why = err if err is not None else "another rank could not load its part"
                self.log(f"[checkpoint] skipping {path.name}: {why}")
                continue
            return path, found
        return None

    def apply(self, loaded: Loaded) -> None:
        """Load every part from a verified checkpoint (shared parts first, in order: the model
        before the optimizer, whose ZeRO masters refresh from it)."""
        main = loaded.main
        own = loaded.mine if loaded.mine is not None else main["rank0"]
        try:
            for name, part in self.parts.items():
                part.load_state_dict(main if name == self.inline else main[name])
            for name, part in self.rank_parts.items():
                part.load_state_dict(loaded.gathered[name] if name in loaded.gathered else own[name])
        except ValueError as e:  # e.g. another global batch, or an earlier per-rank reader state
            raise RunDirError(f"run dir {self.run.path}: checkpoint at step {main['step']}: {e}") from None

    # ------------------------------------------------------------------ start
    def start(self, requested: Any) -> rundir.StartPlan:
        """Every rank: plan the start with the run directory (afresh or resumed: the checkpoint is
        loaded into the parts), agree on the run id; then rank 0 records it in the run directory.
        ``requested``: the run's :class:`bmb.config.Config`. Returns the plan (``.retune``: the
        restored hyperparameters must take the requested values)."""
        # Every check (run identity, checkpoint seals, config changes) happens before the first
        # write: a refusal leaves the run directory exactly as it was.
        plan = self.run.plan(requested, self.dataset_build_id, self.load_newest, self.load)
        if plan.loaded is not None:
            self.apply(plan.loaded)
            moved = (f" (written by {plan.loaded.main['world_size']} processes, continuing with "
                     f"{self.coll.world_size})" if plan.loaded.main["world_size"] != self.coll.world_size else "")
            self.log(f"[resume] from {plan.shown} at step {plan.step}{moved}")
        self.run_id = plan.run_id if plan.run_id is not None else self.agree_run_id()
        self.barrier()
        if self.main:
            self.run.record(plan, self.run_id, requested)
        return plan

    def agree_run_id(self) -> str:
        """A new run id, the same on every rank (rank 0's)."""
        ids = [rundir.new_run_id()]
        if self.coll.active:
            import torch.distributed as dist

            dist.broadcast_object_list(ids, src=0, group=self.coll._host())
        return ids[0]
