"""Checkpoint save and resume for the :class:`bmb.engine.Trainer`, with the run's identity.

:class:`Checkpointer` is the trainer's only contact with ``checkpoints/`` and with the run
identity files (``run.json``, ``history.jsonl``; :mod:`bmb.rundir`):

- :meth:`Checkpointer.save` writes the trainer's state (every rank; sealed files, see
  :mod:`bmb.checkpoint`) and prunes this run's old checkpoints;
- :meth:`Checkpointer.start` decides, reading only, whether the run starts afresh or resumes and
  from which checkpoint (a refusal raises :class:`bmb.rundir.RunDirError` before anything in the
  run directory is written), loads that checkpoint into the trainer, agrees on the run id, then
  (rank 0) records the start or resume in the run directory and writes ``config.yaml``.

What a checkpoint holds is :meth:`Checkpointer.main_state` (rank 0's file: weights, EMA,
optimizer, schedule, algorithm state, evaluation history, rank 0's reader and RNG state) and
:meth:`Checkpointer.rank_state` (one file per other rank).

**Another world size.** Under DDP every rank holds the same weights, EMA, optimizer, schedule,
bank, N̂ and augmentation generator, and the readers' position is one position in the global
sample order (``pipelines.sampling``): a checkpoint written by ``R`` processes resumes with
``R' != R`` exactly at the same global batch, every rank from rank 0's state. Refused (before
anything is written, naming the cause) where the state is truly per rank: a DeepSpeed ZeRO
optimizer (partitioned over the ranks that wrote it) and a reader whose position is per rank
(webdataset ``order=stream``, ffcv ``quasi_random``, DALI).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bmb import checkpoint as ckpt
from bmb import guards, rundir
from bmb.config import config_to_dict, dump_config
from bmb.optim import lr_lambda
from bmb.rundir import RunDirError

if TYPE_CHECKING:
    from bmb.engine import Trainer


class Checkpointer:
    """Saves and restores one :class:`~bmb.engine.Trainer`'s state in its run directory."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def start(self) -> None:
        """Every rank: plan the start (afresh or resumed; the checkpoint is loaded into the
        trainer), set ``trainer.run_id``; then rank 0 records it in the run directory."""
        t = self.trainer
        # Every check (run identity, checkpoint seals, config changes) happens before the first
        # write: a refusal leaves the run directory exactly as it was.
        plan = self.plan_start()
        t.run_id = plan["run_id"] if not plan["fresh"] else self.agree_run_id()
        t.acc.wait_for_everyone()
        if t.main:
            self.record_start(plan)

    def rank_state(self, template: bool = False) -> dict[str, Any]:
        """This rank's state; ``template``: the same keys, without asking the reader or DeepSpeed
        for their state (what a checkpoint is checked against before it is restored)."""
        t = self.trainer
        return {"run_id": t.run_id, "stream": None if template else t.stream.state_dict(),
                "aug_gen": t.aug_gen.get_state(),
                "optimizer": t.optimizer.state_dict() if t.deepspeed and not template else None,
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state() if t.device.type == "cuda" else None}

    def main_state(self, template: bool = False) -> dict[str, Any]:
        t = self.trainer
        return {
            "format": ckpt.FORMAT, "run_id": t.run_id,
            "step": t.step, "world_size": t.coll.world_size, "config": config_to_dict(t.cfg),
            "model": t.raw_model.state_dict(), "ema": t.ema.state_dict(),
            "optimizer": None if t.deepspeed else t.optimizer.state_dict(),
            "scheduler": t.scheduler.state_dict(),
            "algorithm": t.algorithm.extra_state(), "history": t.history,
            "get_hist": t.get_hist.cpu().clone(), "rank0": self.rank_state(template),
            # not in the template: checkpoints from before it are still resumed (not compared)
            **({} if template else {"dataset_build_id": t.dataset_build_id}),
        }

    def save(self) -> None:
        """All ranks call this; rank files first, then rank 0's main file (its presence = complete).
        Every file is sealed with its hash, this run's id and the step; pruning only ever removes
        this run's checkpoints."""
        t = self.trainer
        t.acc.wait_for_everyone()
        meta = {"run_id": t.run_id, "step": t.step}
        if t.coll.rank > 0:
            ckpt.atomic_save(self.rank_state(), ckpt.rank_path(t.ckpt_dir, t.step, t.coll.rank),
                             {**meta, "rank": t.coll.rank})
        t.acc.wait_for_everyone()
        if t.main:
            ckpt.atomic_save(self.main_state(), ckpt.main_path(t.ckpt_dir, t.step),
                             {**meta, "world_size": t.coll.world_size})
            ckpt.prune(t.ckpt_dir, t.cfg.train.keep_checkpoints, t.run_id)
        t.acc.wait_for_everyone()

    def _safe_globals(self) -> list[Any]:
        t = self.trainer
        return ckpt.deepspeed_safe_globals() if t.deepspeed else []

    def _check_keys(self, name: str, got: Any, template: dict[str, Any], skip: tuple[str, ...]) -> None:
        """Raise :class:`ckpt.CheckpointError` naming every key of ``template`` (what this trainer
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

    def _load_candidate(self, path: Path, step: int | None, run_id: str | None) -> tuple[dict, dict | None, list]:
        """Verify and load one checkpoint for this rank: ``(main, this rank's state, DeepSpeed
        optimizer parts)``. Raises :class:`ckpt.CheckpointError` on anything unusable."""
        t = self.trainer
        folder = path.parent
        main, seal = ckpt.load_verified(path, self._safe_globals())
        # "config" may predate keys added since (compared by value later); the DeepSpeed
        # optimizer's layout is DeepSpeed's business; history rows vary.
        skip = ("config", "history", "optimizer", "rank0.optimizer")
        self._check_keys(path.name, main, self.main_state(template=True), skip)
        if not t.deepspeed:
            self._check_keys(path.name, main["optimizer"], {"state": {}, "param_groups": []}, ())
        guards.refuse_nonfinite_checkpoint(path.name, main)  # a diverged state: fall back, loudly
        if step is None:
            step = main["step"]
        if main["step"] != step or seal.get("step") != step:
            raise ckpt.CheckpointError(f"{path.name}: holds step {main['step']} (sealed as {seal.get('step')})")
        if main["run_id"] != seal.get("run_id") or (run_id is not None and main["run_id"] != run_id):
            raise ckpt.CheckpointError(f"{path.name}: written by run {main['run_id']} (sealed as "
                                       f"{seal.get('run_id')}), not by run {run_id}")
        world = main["world_size"]
        if world != t.coll.world_size:
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
            if not ckpt.rank_path(folder, step, r).is_file() or ckpt.read_seal(ckpt.rank_path(folder, step, r)) is None:
                raise ckpt.CheckpointError(f"{path.name}: rank file {ckpt.rank_path(folder, step, r).name} missing "
                                           "or unsealed")
        # Another world size: every rank continues from rank 0's state (see the module docstring).
        mine = rank_file(t.coll.rank) if 0 < t.coll.rank and world == t.coll.world_size else None
        parts: list = []
        if t.deepspeed:
            parts = [main["rank0"]["optimizer"]] + [
                mine["optimizer"] if r == t.coll.rank else rank_file(r)["optimizer"] for r in range(1, world)]
        return main, mine, parts

    def _check_portable(self, path: Path, main: dict) -> None:
        """Raise :class:`RunDirError` naming the cause unless the checkpoint ``main`` (written by
        another number of processes) can resume at this world size."""
        t = self.trainer
        world, now = main["world_size"], t.coll.world_size
        head = (f"run dir {t.run_dir}: checkpoint {path.name} (step {main['step']}) was written by {world} "
                f"processes, this run has {now}")
        if t.deepspeed:
            raise RunDirError(f"{head}; its DeepSpeed ZeRO optimizer state is partitioned over those {world} "
                              f"ranks (one part per rank file) and is not re-partitioned for {now}: resume with "
                              f"{world} processes (DDP checkpoints resume at any world size)")
        reader = main["rank0"]["stream"]
        if not global_reader_position(reader):
            raise RunDirError(f"{head}; its reader state (backend {reader.get('backend')!r}, order "
                              f"{reader.get('order')!r}) is a position per rank, which another number of "
                              f"processes cannot continue exactly: resume with {world} processes")

    def _load_newest(self, candidates: list[tuple[int, Path]], run_id: str) -> tuple | None:
        """Newest of this run's checkpoints that every rank can load; the others are skipped loudly."""
        t = self.trainer
        for step, path in reversed(candidates):
            err: Exception | None = None
            try:
                found = self._load_candidate(path, step, run_id)
            except ckpt.CheckpointError as e:
                err = e
            if t.coll.any_true(err is not None):  # all ranks move on together
                why = err if err is not None else "another rank could not load its part"
                t.log(f"[checkpoint] skipping {path.name}: {why}")
                continue
            return path, found
        return None

    def plan_start(self) -> dict[str, Any]:
        """Decide, reading only, how this run starts: afresh or from which checkpoint, and load that
        checkpoint into the trainer. Raises :class:`RunDirError` (on every rank) before anything in
        the run directory is written when it cannot start as asked."""
        t = self.trainer
        cfg, run_dir, mode = t.cfg, t.run_dir, t.cfg.train.resume
        ident = rundir.read_identity(run_dir)
        results = rundir.results_present(run_dir)
        all_ckpts = [p for _, p in ckpt.list_checkpoints(t.ckpt_dir)]
        fresh = {"fresh": True, "run_id": None}
        if mode == "none":
            if all_ckpts or results:
                rundir.refuse_leftovers(
                    run_dir, "train.resume=none starts a new run here, but the directory is in use", ident, all_ckpts,
                    results, "Start the new run elsewhere (another name=... or train.out_dir=...), move or delete "
                    "this directory, or continue its run with train.resume=auto.")
            return fresh
        if mode == "auto":
            own, other = ckpt.split_by_run(t.ckpt_dir, ident["run_id"] if ident else None)
            if ident is None:
                if other or results:
                    rundir.refuse_leftovers(
                        run_dir, f"no {rundir.RUN_FILE}, so it cannot tell which run these belong to", None,
                        [p for _, p in other], results, "Move or delete them (or the directory) to start afresh, or "
                        "use another name=...")
                return fresh
            if other:
                t.log(f"[checkpoint] ignoring {len(other)} file(s) in {t.ckpt_dir} not sealed by run "
                      f"{ident['run_id']} (they are never loaded nor pruned): "
                      + ", ".join(p.name for _, p in other))
            loaded = self._load_newest(own, ident["run_id"])
            if loaded is None:
                if own or results:
                    rundir.refuse_leftovers(
                        run_dir, f"no usable checkpoint of run {ident['run_id']} to resume from, and starting over "
                        "would overwrite its results", ident, [p for _, p in own], results,
                        "To start over, move or delete the directory (or those files); to keep it, use another "
                        "name=...; to resume from a particular checkpoint, train.resume=<path>.")
                return fresh
            path, (main, mine, parts) = loaded
        else:
            path = Path(mode)
            if not path.is_file():
                raise FileNotFoundError(f"train.resume: checkpoint file not found: {path}")
            try:
                main, mine, parts = self._load_candidate(path, None, None)
            except ckpt.CheckpointError as e:
                raise RunDirError(f"run dir {run_dir}: train.resume={path}: {e}") from None
            if ident is not None and ident["run_id"] != main["run_id"]:
                raise RunDirError(f"run dir {run_dir} holds run {ident['run_id']}, but {path} belongs to run "
                                  f"{main['run_id']}; nothing was written. Resume it in its own directory or a "
                                  "new one (another name=...)")
            if ident is None:
                stray = all_ckpts
                if stray or results:
                    rundir.refuse_leftovers(run_dir, f"no {rundir.RUN_FILE}, so it cannot tell which run these "
                                            "belong to", None, stray, results, "Resume into an empty directory.")
        # This run's checkpoints past the one resumed from are off the new timeline (skipped as
        # unusable, or abandoned by resuming from an older file): set aside once the checks pass,
        # so that neither a later resume=auto nor pruning mistakes them for the newest.
        own_now, _ = ckpt.split_by_run(t.ckpt_dir, main["run_id"])
        later = [p for s, p in own_now if s > main["step"]]
        changes = rundir.classify(main["config"], cfg)
        rundir.refuse_changes(run_dir, main["run_id"], main["step"], changes, cfg.train.allow_config_change)
        dataset = rundir.dataset_change(run_dir, main, t.dataset_build_id, cfg.train.allow_dataset_change)
        self._apply(main, mine, parts)
        if any(c.kind == "guarded" for c in changes):
            self._apply_config_changes()
        moved = (f" (written by {main['world_size']} processes, continuing with {t.coll.world_size})"
                 if main["world_size"] != t.coll.world_size else "")
        t.log(f"[resume] from {path if mode != 'auto' else ckpt.main_path(t.ckpt_dir, t.step)} "
              f"at step {t.step}{moved}")
        return {"fresh": False, "run_id": main["run_id"], "path": str(path), "step": t.step,
                "changes": changes, "adopted": ident is None, "config": main["config"], "later": later,
                "dataset_change": dataset}

    def agree_run_id(self) -> str:
        """A new run id, the same on every rank (rank 0's)."""
        t = self.trainer
        ids = [rundir.new_run_id()]
        if t.coll.active:
            import torch.distributed as dist

            dist.broadcast_object_list(ids, src=0, group=t.coll._host())
        return ids[0]

    def _apply(self, main: dict, mine: dict | None, parts: list) -> None:
        t = self.trainer
        t.raw_model.load_state_dict(main["model"])  # before the optimizer: ZeRO refreshes its masters from it
        t.ema.load_state_dict(main["ema"])
        if t.deepspeed:
            t.optimizer.load_state_dict(parts)
        else:
            t.optimizer.load_state_dict(main["optimizer"])
        t.scheduler.load_state_dict(main["scheduler"])
        t.algorithm.load_extra_state(main["algorithm"])
        t.history = list(main["history"])
        t.get_hist = main["get_hist"].to(t.device).clone()
        rs = mine if mine is not None else main["rank0"]
        try:
            t.stream.load_state_dict(rs["stream"])
        except ValueError as e:  # e.g. another global batch, or an earlier per-rank reader state
            raise RunDirError(f"run dir {t.run_dir}: checkpoint at step {main['step']}: {e}") from None
        t.aug_gen.set_state(rs["aug_gen"])
        torch.set_rng_state(rs["torch_rng"])
        if rs["cuda_rng"] is not None and t.device.type == "cuda":
            torch.cuda.set_rng_state(rs["cuda_rng"])
        t.step = int(main["step"])

    def _apply_config_changes(self) -> None:
        """After an opted-in config change: the hyperparameters the restored state carries (the
        optimizer's lr and decay, the schedule's base lr, the bank's powers, the EMA decay) take the
        requested values, so that the run does what ``config.yaml`` says."""
        t = self.trainer
        o = t.cfg.optim
        sched = getattr(t.scheduler, "scheduler", t.scheduler)
        groups = t.optimizer.param_groups
        for g in groups:
            g["initial_lr"], g["weight_decay"] = o.lr, o.weight_decay
            if o.name == "sgd":
                g["momentum"], g["nesterov"] = o.momentum, o.nesterov
        sched.base_lrs = [o.lr for _ in groups]
        factor = lr_lambda(t.cfg)(sched.last_epoch)
        for g in groups:
            g["lr"] = o.lr * factor
        sched._last_lr = [g["lr"] for g in groups]
        t.algorithm.retune(t.cfg.method)
        t.ema.decay = t.cfg.train.ema_decay

    def record_start(self, plan: dict[str, Any]) -> None:
        """Rank 0, after :meth:`plan_start` accepted: the run's files say what this run is."""
        t = self.trainer
        t.run_dir.mkdir(parents=True, exist_ok=True)
        gone = ckpt.clean_orphans(t.ckpt_dir)  # temp files of writers killed mid-save (the lock is ours)
        if gone:
            t.log(f"[checkpoint] removed {len(gone)} unfinished temp file(s) of killed writers: {', '.join(gone)}")
        if plan["fresh"]:
            rundir.write_identity(t.run_dir, t.run_id, config_to_dict(t.cfg))
            rundir.append_history(t.run_dir, "start", t.run_id, step=0)
        else:
            if plan["adopted"]:  # resumed from a checkpoint file into an empty directory
                rundir.write_identity(t.run_dir, t.run_id, plan["config"], adopted_from=plan["path"])
            changes = plan["changes"]
            if plan["later"]:
                ckpt.set_aside(t.ckpt_dir, plan["later"], "set-aside")
                t.log(f"[checkpoint] moved checkpoint(s) of run {t.run_id} past step {plan['step']} (unusable, "
                      f"or abandoned by this resume) to {t.ckpt_dir / 'set-aside'}: "
                      + ", ".join(p.name for p in plan["later"]))
            rundir.append_history(t.run_dir, "resume", t.run_id, step=plan["step"], checkpoint=plan["path"],
                                  changed=[c.as_json() for c in changes if c.kind == "free"],
                                  set_aside=[p.name for p in plan["later"]])
            guarded = [c for c in changes if c.kind == "guarded"]
            if guarded:
                rundir.append_history(t.run_dir, "config_change", t.run_id, step=plan["step"],
                                      changes=[c.as_json() for c in guarded])
                t.log(f"[config] run {t.run_id} continues at step {plan['step']} with "
                      + "; ".join(c.describe() for c in guarded) + f" (train.allow_config_change=true; "
                      f"recorded in {t.run_dir / rundir.HISTORY_FILE})")
        if not plan["fresh"] and plan["dataset_change"]:
            rundir.append_history(t.run_dir, "dataset_change", t.run_id, step=plan["step"], **plan["dataset_change"])
            t.log(f"[data] run {t.run_id} continues at step {plan['step']} on a rebuilt dataset: build_id "
                  f"{plan['dataset_change']['from']} -> {plan['dataset_change']['to']} (train.allow_dataset_change)")
        dump_config(t.cfg, t.run_dir / "config.yaml")


def global_reader_position(reader: dict[str, Any]) -> bool:
    """Whether a reader's state is a position in the global sample order (both streams'
    ``pipelines.sampling.IndexStream`` states, in an exact order), the same at any world size."""
    streams = [reader.get(name) for name in ("labeled", "unlabeled")]
    return (reader.get("order", "exact") in ("exact", "index")
            and all(isinstance(st, dict) and st.get("order") == "global" for st in streams))
