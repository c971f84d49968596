"""The training loop: one object that runs steps, evaluates, logs and checkpoints.

It is handed everything it trains with (model, algorithm, input stream, view maker, evaluation
sources) by ``launch/train.py``, so it knows nothing about where data comes from. Accelerate
supplies the device, mixed precision and DDP/DeepSpeed wrapping.

Run directory (``train.out_dir/name``)::

    config.yaml        the resolved config (written once the start/resume checks pass: the truth)
    run.json           run id and the config the run was started with (bmb.rundir)
    history.jsonl      start / resume / config_change / finish events (bmb.rundir)
    metrics.jsonl      one JSON object per evaluation
    train.jsonl        smoothed training scalars every ``log_every`` steps
    final.json         the result under the configured protocol
    checkpoints/       see bmb.checkpoint
    tb/                TensorBoard scalars
"""

from __future__ import annotations

import json
import math
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bmb import checkpoint as ckpt
from bmb import rundir
from bmb.algorithms import Algorithm, StepOutputs
from bmb.config import Config, config_to_dict, dump_config
from bmb.dist import Collectives
from bmb.ema import ModelEMA
from bmb.metrics import ConfusionMatrix, default_thresholds, group_recall, mean_recall, shot_groups
from bmb.rundir import RunDirError

# Exit codes the SLURM scripts understand.
EXIT_PREEMPTED = 3  # SIGTERM / SIGUSR1: checkpoint written, please requeue
EXIT_INTERRUPTED = 130  # SIGINT (Ctrl-C): checkpoint written, stop


_IMPL_FLAGS = ("fused", "foreach")


def build_optimizer(cfg: Config, params: Iterable[nn.Parameter],
                    device: torch.device | str | None = None) -> torch.optim.Optimizer:
    """The configured optimizer for parameters that will live on ``device``.

    On CUDA it is the fused implementation (``fused=True``, which AdamW, Adam and SGD all have:
    the whole update of a chunk of tensors in one kernel, where foreach launches one per
    elementwise op; under fp16 loss scaling the inf check also stays on the device, where the
    unfused step reads it on the host).
    Elsewhere torch's default (a per-parameter loop on the CPU): the CPU step is unchanged. The
    parameters may still be on the CPU here (Accelerate moves them later): the fused kernels'
    device check runs at the first step. No config key: it is the same update up to rounding.

    A checkpoint's param groups carry the flags of the optimizer that wrote it; on loading, this
    optimizer keeps its own (the device decides, not the checkpoint), so that a run resumed on
    another device, or from a checkpoint written before this choice, gets the device's best.
    """
    o = cfg.optim
    impl = {"fused": True} if device is not None and torch.device(device).type == "cuda" else {}
    if o.name == "adamw":  # decoupled: w <- w (1 - lr wd), the authors' WeightEMA decay (docs/fidelity.md)
        opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, **impl)
    elif o.name == "adam":
        opt = torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay, **impl)
    else:
        opt = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                              weight_decay=o.weight_decay, **impl)
    opt.register_load_state_dict_pre_hook(_keep_own_implementation)
    return opt


def _keep_own_implementation(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """Load-state-dict pre-hook: the incoming groups take this optimizer's fused/foreach flags
    (torch then places the restored step counters as this implementation wants them)."""
    mine = optimizer.param_groups
    groups = [{**g, **{k: mine[i][k] for k in _IMPL_FLAGS if k in mine[i]}} if i < len(mine) else g
              for i, g in enumerate(state_dict["param_groups"])]
    return {**state_dict, "param_groups": groups}


def lr_lambda(cfg: Config) -> Callable[[int], float]:
    """Multiplier of the base lr at a step: linear warm-up, then constant or cosine to 0 (moving
    every step, or held through each epoch with ``optim.schedule_unit=epoch``)."""
    total, warm, cosine = cfg.total_steps, cfg.optim.warmup_steps, cfg.optim.schedule == "cosine"
    per_epoch = cfg.train.iters_per_epoch if cfg.optim.schedule_unit == "epoch" else 1

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if not cosine:
            return 1.0
        step -= step % per_epoch  # the epoch's first step
        return 0.5 * (1.0 + math.cos(math.pi * min(step - warm, total) / max(total - warm, 1)))

    return f


@dataclass
class EvalResult:
    top1: float
    mean_recall: float
    per_class_recall: list[float]
    groups: dict[str, float]


class _Signals:
    """Turns SIGINT/SIGTERM/SIGUSR1 into a flag checked between steps (the step in flight finishes)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGUSR1", None)):
            if s is not None:
                try:
                    self._old[s] = signal.signal(s, self._handle)
                except ValueError:  # not the main thread
                    pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.received = signum

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


class Trainer:
    """Runs BMB or FixMatch training as configured.

    Args:
        cfg: the resolved config.
        accelerator: an ``accelerate.Accelerator`` (device, precision, process group).
        model: a :class:`bmb.models.BMBModel` (not yet prepared).
        algorithm: from :func:`bmb.algorithms.build_algorithm`.
        stream: this rank's :class:`pipelines.base.TrainStream` (any object with
            ``__iter__``/``state_dict``/``load_state_dict`` yielding batches with fields
            ``labeled, labels, unlabeled, unlabeled_index``).
        views: callable ``(labeled u8, unlabeled u8, generator) -> (lw, uw, [us...])`` normalised
            floats, with ``.eval(u8) -> float`` for evaluation.
        eval_sources: split name -> evaluation source for this rank (yields ``(images, labels[, valid])``).
        labeled_counts: ``(C,)`` labeled class counts (many/medium/few and weights).
        class_names: for the printed table.
        run_dir: where everything is written.
    """

    def __init__(self, cfg: Config, accelerator: Any, model: nn.Module, algorithm: Algorithm,
                 stream: Any, views: Any, eval_sources: dict[str, Any], labeled_counts: torch.Tensor,
                 class_names: list[str], run_dir: str | Path, log: Callable[[str], None] = print) -> None:
        self.cfg, self.acc, self.algorithm = cfg, accelerator, algorithm
        self.stream, self.views, self.eval_sources = stream, views, eval_sources
        self.labeled_counts = torch.as_tensor(labeled_counts)
        self.class_names = class_names
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.main = accelerator.is_main_process
        self.log = log if self.main else (lambda *_: None)
        self.coll = Collectives()
        self.device = accelerator.device

        optimizer = build_optimizer(cfg, model.parameters(), self.device)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
        ds = getattr(accelerator.state, "deepspeed_plugin", None)
        # ZeRO partitions the optimizer state: every rank saves and restores its own part.
        self.deepspeed = ds is not None
        if self.deepspeed and ds.deepspeed_config.get("train_micro_batch_size_per_gpu") in (None, "auto"):
            # We feed batches ourselves (no DataLoader for Accelerate to read the size from).
            ds.deepspeed_config["train_micro_batch_size_per_gpu"] = max(cfg.train.labeled_batch // accelerator.num_processes, 1)
        self.model, self.optimizer, self.scheduler = accelerator.prepare(model, optimizer, scheduler)
        self.algorithm.to(self.device)
        self.ema = ModelEMA(self.raw_model, cfg.train.ema_decay)
        # Augmentation randomness differs per rank (different samples); the bank's generator,
        # inside the algorithm, is identical on every rank.
        self.aug_gen = torch.Generator().manual_seed(cfg.train.seed * 1000 + 17 + self.coll.rank)
        self.step = 0
        self.run_id: str | None = None  # set by fit(): a new id, or the resumed checkpoint's
        self.history: list[dict[str, Any]] = []
        many, few = cfg.train.many_above, cfg.train.few_at_most
        if many is None or few is None:
            d_many, d_few = default_thresholds(self.labeled_counts)
            many, few = (d_many if many is None else many), (d_few if few is None else few)
        self.groups = shot_groups(self.labeled_counts, many, few)
        self.thresholds = (many, few)
        self.get_hist = torch.zeros(len(class_names), dtype=torch.long, device=self.device)
        self.tb = None

    @property
    def raw_model(self) -> nn.Module:
        return self.acc.unwrap_model(self.model)

    # ------------------------------------------------------------------ state
    def _rank_state(self, template: bool = False) -> dict[str, Any]:
        """This rank's state; ``template``: the same keys, without asking the reader or DeepSpeed
        for their state (what a checkpoint is checked against before it is restored)."""
        return {"run_id": self.run_id, "stream": None if template else self.stream.state_dict(),
                "aug_gen": self.aug_gen.get_state(),
                "optimizer": self.optimizer.state_dict() if self.deepspeed and not template else None,
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state() if self.device.type == "cuda" else None}

    def _main_state(self, template: bool = False) -> dict[str, Any]:
        return {
            "format": ckpt.FORMAT, "run_id": self.run_id,
            "step": self.step, "world_size": self.coll.world_size, "config": config_to_dict(self.cfg),
            "model": self.raw_model.state_dict(), "ema": self.ema.state_dict(),
            "optimizer": None if self.deepspeed else self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "algorithm": self.algorithm.extra_state(), "history": self.history,
            "get_hist": self.get_hist.cpu().clone(), "rank0": self._rank_state(template),
        }

    def save_checkpoint(self) -> None:
        """All ranks call this; rank files first, then rank 0's main file (its presence = complete).
        Every file is sealed with its hash, this run's id and the step; pruning only ever removes
        this run's checkpoints."""
        self.acc.wait_for_everyone()
        meta = {"run_id": self.run_id, "step": self.step}
        if self.coll.rank > 0:
            ckpt.atomic_save(self._rank_state(), ckpt.rank_path(self.ckpt_dir, self.step, self.coll.rank),
                             {**meta, "rank": self.coll.rank})
        self.acc.wait_for_everyone()
        if self.main:
            ckpt.atomic_save(self._main_state(), ckpt.main_path(self.ckpt_dir, self.step),
                             {**meta, "world_size": self.coll.world_size})
            ckpt.prune(self.ckpt_dir, self.cfg.train.keep_checkpoints, self.run_id)
        self.acc.wait_for_everyone()

    # ------------------------------------------------------------------ resume
    def _safe_globals(self) -> list[Any]:
        return ckpt.deepspeed_safe_globals() if self.deepspeed else []

    def _check_keys(self, name: str, got: Any, template: dict[str, Any], skip: tuple[str, ...]) -> None:
        """Raise :class:`ckpt.CheckpointError` naming every key of ``template`` (what this trainer
        saves now, nested dicts followed) that ``got`` lacks."""
        missing: list[str] = []

        def walk(t: dict, g: Any, prefix: str) -> None:
            if not isinstance(g, dict):
                missing.append(f"{prefix.rstrip('.') or '<top level>'} (not a mapping)")
                return
            for k, v in t.items():
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
        folder = path.parent
        main, seal = ckpt.load_verified(path, self._safe_globals())
        # "config" may predate keys added since (compared by value later); the DeepSpeed
        # optimizer's layout is DeepSpeed's business; history rows vary.
        skip = ("config", "history", "optimizer", "rank0.optimizer")
        self._check_keys(path.name, main, self._main_state(template=True), skip)
        if not self.deepspeed:
            self._check_keys(path.name, main["optimizer"], {"state": {}, "param_groups": []}, ())
        if step is None:
            step = main["step"]
        if main["step"] != step or seal.get("step") != step:
            raise ckpt.CheckpointError(f"{path.name}: holds step {main['step']} (sealed as {seal.get('step')})")
        if main["run_id"] != seal.get("run_id") or (run_id is not None and main["run_id"] != run_id):
            raise ckpt.CheckpointError(f"{path.name}: written by run {main['run_id']} (sealed as "
                                       f"{seal.get('run_id')}), not by run {run_id}")
        world = main["world_size"]
        if world != self.coll.world_size:
            raise RunDirError(f"run dir {self.run_dir}: checkpoint {path.name} (step {step}) was written by {world} "
                              f"processes, this run has {self.coll.world_size}; resume with the same number")

        def rank_file(r: int) -> dict:
            rp = ckpt.rank_path(folder, step, r)
            if not rp.is_file():
                raise ckpt.CheckpointError(f"{path.name}: rank file {rp.name} missing")
            state, rseal = ckpt.load_verified(rp, self._safe_globals())
            self._check_keys(rp.name, state, self._rank_state(template=True), ())
            if {rseal.get("run_id"), state["run_id"]} != {main["run_id"]} or rseal.get("step") != step:
                raise ckpt.CheckpointError(f"{rp.name} belongs to run {state['run_id']} (sealed as "
                                           f"{rseal.get('run_id')}, step {rseal.get('step')})")
            return state

        for r in range(1, world):  # complete = every rank file present and sealed
            if not ckpt.rank_path(folder, step, r).is_file() or ckpt.read_seal(ckpt.rank_path(folder, step, r)) is None:
                raise ckpt.CheckpointError(f"{path.name}: rank file {ckpt.rank_path(folder, step, r).name} missing "
                                           "or unsealed")
        mine = rank_file(self.coll.rank) if self.coll.rank > 0 else None
        parts: list = []
        if self.deepspeed:
            parts = [main["rank0"]["optimizer"]] + [
                mine["optimizer"] if r == self.coll.rank else rank_file(r)["optimizer"] for r in range(1, world)]
        return main, mine, parts

    def _load_newest(self, candidates: list[tuple[int, Path]], run_id: str) -> tuple | None:
        """Newest of this run's checkpoints that every rank can load; the others are skipped loudly."""
        for step, path in reversed(candidates):
            err: Exception | None = None
            try:
                found = self._load_candidate(path, step, run_id)
            except ckpt.CheckpointError as e:
                err = e
            if self.coll.any_true(err is not None):  # all ranks move on together
                why = err if err is not None else "another rank could not load its part"
                self.log(f"[checkpoint] skipping {path.name}: {why}")
                continue
            return path, found
        return None

    def plan_start(self) -> dict[str, Any]:
        """Decide, reading only, how this run starts: afresh or from which checkpoint, and load that
        checkpoint into the trainer. Raises :class:`RunDirError` (on every rank) before anything in
        the run directory is written when it cannot start as asked."""
        cfg, run_dir, mode = self.cfg, self.run_dir, self.cfg.train.resume
        ident = rundir.read_identity(run_dir)
        results = rundir.results_present(run_dir)
        all_ckpts = [p for _, p in ckpt.list_checkpoints(self.ckpt_dir)]
        fresh = {"fresh": True, "run_id": None}
        if mode == "none":
            if all_ckpts or results:
                rundir.refuse_leftovers(
                    run_dir, "train.resume=none starts a new run here, but the directory is in use", ident, all_ckpts,
                    results, "Start the new run elsewhere (another name=... or train.out_dir=...), move or delete "
                    "this directory, or continue its run with train.resume=auto.")
            return fresh
        if mode == "auto":
            own, other = ckpt.split_by_run(self.ckpt_dir, ident["run_id"] if ident else None)
            if ident is None:
                if other or results:
                    rundir.refuse_leftovers(
                        run_dir, f"no {rundir.RUN_FILE}, so it cannot tell which run these belong to", None,
                        [p for _, p in other], results, "Move or delete them (or the directory) to start afresh, or "
                        "use another name=...")
                return fresh
            if other:
                self.log(f"[checkpoint] ignoring {len(other)} file(s) in {self.ckpt_dir} not sealed by run "
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
        own_now, _ = ckpt.split_by_run(self.ckpt_dir, main["run_id"])
        later = [p for s, p in own_now if s > main["step"]]
        changes = rundir.classify(main["config"], cfg)
        rundir.refuse_changes(run_dir, main["run_id"], main["step"], changes, cfg.train.allow_config_change)
        self._apply(main, mine, parts)
        if any(c.kind == "guarded" for c in changes):
            self._apply_config_to_restored_state()
        self.log(f"[resume] from {path if mode != 'auto' else ckpt.main_path(self.ckpt_dir, self.step)} "
                 f"at step {self.step}")
        return {"fresh": False, "run_id": main["run_id"], "path": str(path), "step": self.step,
                "changes": changes, "adopted": ident is None, "config": main["config"], "later": later}

    def _agree_run_id(self) -> str:
        """A new run id, the same on every rank (rank 0's)."""
        ids = [rundir.new_run_id()]
        if self.coll.active:
            import torch.distributed as dist

            dist.broadcast_object_list(ids, src=0, group=self.coll._host())
        return ids[0]

    def maybe_resume(self) -> bool:
        """Restore the newest usable checkpoint per ``train.resume`` (see :meth:`plan_start`);
        True if one was loaded."""
        plan = self.plan_start()
        self.run_id = plan["run_id"] if not plan["fresh"] else self._agree_run_id()
        return not plan["fresh"]

    def _apply(self, main: dict, mine: dict | None, parts: list) -> None:
        self.raw_model.load_state_dict(main["model"])  # before the optimizer: ZeRO refreshes its masters from it
        self.ema.load_state_dict(main["ema"])
        if self.deepspeed:
            self.optimizer.load_state_dict(parts)
        else:
            self.optimizer.load_state_dict(main["optimizer"])
        self.scheduler.load_state_dict(main["scheduler"])
        self.algorithm.load_extra_state(main["algorithm"])
        self.history = list(main["history"])
        self.get_hist = main["get_hist"].to(self.device).clone()
        rs = main["rank0"] if self.coll.rank == 0 else mine
        self.stream.load_state_dict(rs["stream"])
        self.aug_gen.set_state(rs["aug_gen"])
        torch.set_rng_state(rs["torch_rng"])
        if rs["cuda_rng"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(rs["cuda_rng"])
        self.step = int(main["step"])

    def _apply_config_to_restored_state(self) -> None:
        """After an opted-in config change: the hyperparameters the restored state carries (the
        optimizer's lr and decay, the schedule's base lr, the bank's powers, the EMA decay) take the
        requested values, so that the run does what ``config.yaml`` says."""
        o = self.cfg.optim
        sched = getattr(self.scheduler, "scheduler", self.scheduler)
        groups = self.optimizer.param_groups
        for g in groups:
            g["initial_lr"], g["weight_decay"] = o.lr, o.weight_decay
            if o.name == "sgd":
                g["momentum"], g["nesterov"] = o.momentum, o.nesterov
        sched.base_lrs = [o.lr for _ in groups]
        factor = lr_lambda(self.cfg)(sched.last_epoch)
        for g in groups:
            g["lr"] = o.lr * factor
        sched._last_lr = [g["lr"] for g in groups]
        self.algorithm.retune(self.cfg.method)
        self.ema.decay = self.cfg.train.ema_decay

    def _record_start(self, plan: dict[str, Any]) -> None:
        """Rank 0, after :meth:`plan_start` accepted: the run's files say what this run is."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if plan["fresh"]:
            rundir.write_identity(self.run_dir, self.run_id, config_to_dict(self.cfg))
            rundir.append_history(self.run_dir, "start", self.run_id, step=0)
        else:
            if plan["adopted"]:  # resumed from a checkpoint file into an empty directory
                rundir.write_identity(self.run_dir, self.run_id, plan["config"], adopted_from=plan["path"])
            changes = plan["changes"]
            if plan["later"]:
                ckpt.set_aside(self.ckpt_dir, plan["later"], "set-aside")
                self.log(f"[checkpoint] moved checkpoint(s) of run {self.run_id} past step {plan['step']} (unusable, "
                         f"or abandoned by this resume) to {self.ckpt_dir / 'set-aside'}: "
                         + ", ".join(p.name for p in plan["later"]))
            rundir.append_history(self.run_dir, "resume", self.run_id, step=plan["step"], checkpoint=plan["path"],
                                  changed=[c.as_json() for c in changes if c.kind == "free"],
                                  set_aside=[p.name for p in plan["later"]])
            guarded = [c for c in changes if c.kind == "guarded"]
            if guarded:
                rundir.append_history(self.run_dir, "config_change", self.run_id, step=plan["step"],
                                      changes=[c.as_json() for c in guarded])
                self.log(f"[config] run {self.run_id} continues at step {plan['step']} with "
                         + "; ".join(c.describe() for c in guarded) + f" (train.allow_config_change=true; "
                         f"recorded in {self.run_dir / rundir.HISTORY_FILE})")
        dump_config(self.cfg, self.run_dir / "config.yaml")

    # ------------------------------------------------------------------ one step
    def train_step(self, batch: Any) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        self.model.train()
        made = getattr(batch, "views", None)  # data.views=loader: the loader made them (ViewBatch)
        lw, uw, strong = made if made is not None else self.views(batch.labeled, batch.unlabeled, self.aug_gen)
        bl, bu, k = lw.shape[0], uw.shape[0], len(strong)
        # The model puts x in its memory format (channels_last on CUDA by default: one copy of the
        # batch) and runs its compiled encoder here if model.compile is on; neither syncs.
        x = torch.cat([lw, uw, *strong])
        warmup_steps = cfg.method.warmup_epochs * cfg.train.iters_per_epoch
        with self.acc.autocast():
            out = self.model(x)
            parts = [torch.split(t, [bl, bu, k * bu]) for t in out]
            step_out = StepOutputs(
                labels=batch.labels,
                labeled=type(out)(*(p[0] for p in parts)),
                unlabeled_weak=type(out)(*(p[1] for p in parts)),
                unlabeled_strong=type(out)(*(p[2] for p in parts)),
                unlabeled_on=self.step >= warmup_steps,
                progress=self.step / max(cfg.total_steps, 1),
            )
            losses = self.algorithm(step_out, self.raw_model.aux_head)
        self.optimizer.zero_grad(set_to_none=True)
        self.acc.backward(losses["loss"])
        self.optimizer.step()
        self.scheduler.step()
        self.algorithm.after_step()
        self.ema.update(self.raw_model)
        drawn = self.algorithm.take_drawn()
        if drawn is not None:  # (labels, valid) of the items drawn from the bank this step
            labels, valid = drawn
            self.get_hist.scatter_add_(0, labels.to(self.device), valid.to(self.device, torch.long))
        self.step += 1
        return losses

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate_split(self, source: Iterable) -> dict[str, EvalResult]:
        """Confusion matrices of the EMA aux and base heads and of the non-EMA model's evaluated
        head, summed over ranks."""
        c = len(self.class_names)
        raw_head = "raw_" + self.algorithm.eval_head
        cms = {k: ConfusionMatrix(c) for k in ("ema_aux", "ema_base", raw_head)}
        ema, raw = self.ema.module.eval(), self.raw_model.eval()
        for item in source:
            images, labels = item[0], item[1]
            valid = item[2] if len(item) > 2 else None
            x = self.views.eval(images.to(self.device))
            with self.acc.autocast():
                e, r = ema(x), raw(x)
            cms["ema_aux"].update(e.aux_logits.argmax(-1), labels, valid)
            cms["ema_base"].update(e.base_logits.argmax(-1), labels, valid)
            raw_logits = r.aux_logits if raw_head == "raw_aux" else r.base_logits
            cms[raw_head].update(raw_logits.argmax(-1), labels, valid)
        results = {}
        for k, cm in cms.items():
            cm.matrix = self.coll.all_reduce_sum(cm.matrix.to(self.device)).cpu()
            rec = cm.per_class_recall()
            results[k] = EvalResult(cm.top1(), mean_recall(rec), [float(v) for v in rec],
                                    group_recall(rec, self.groups))
        return results

    def evaluate(self) -> dict[str, Any]:
        """Evaluate every split; returns (and logs) one metrics row."""
        head = "ema_" + self.algorithm.eval_head
        row: dict[str, Any] = {"step": self.step, "epoch": self.step / self.cfg.train.iters_per_epoch}
        for split, source in self.eval_sources.items():
            res = self.evaluate_split(source)
            main = res[head]
            prefix = "" if split == self.cfg.data.eval_split else f"{split}_"
            row.update({f"{prefix}top1": main.top1, f"{prefix}mean_recall": main.mean_recall,
                        f"{prefix}per_class_recall": main.per_class_recall,
                        **{f"{prefix}{g}": v for g, v in main.groups.items()}})
            if not prefix:
                other = "ema_base" if head == "ema_aux" else "ema_aux"
                raw = "raw_" + self.algorithm.eval_head
                row.update({f"{other}_top1": res[other].top1, f"{other}_mean_recall": res[other].mean_recall,
                            f"{raw}_top1": res[raw].top1, f"{raw}_mean_recall": res[raw].mean_recall})
        if hasattr(self.stream, "skipped"):  # corrupt training images skipped so far (this rank)
            row["corrupt_skipped"] = self.stream.skipped
        for split, source in self.eval_sources.items():  # ... and in this evaluation's passes
            if hasattr(source, "skipped"):
                row[f"{split}_corrupt_skipped"] = source.skipped
        stats = self.algorithm.eval_stats()
        if stats:  # BMB: the bank's histogram and N-hat, with the engine's get histogram
            row.update(stats)
            row["get_class_counts"] = self.get_hist.cpu().tolist()
        return row

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict[str, Any] | None:
        """Train to ``total_steps`` (resuming if configured); returns the final result on rank 0.

        Raises ``SystemExit`` with :data:`EXIT_PREEMPTED` / :data:`EXIT_INTERRUPTED` after writing a
        checkpoint when a signal arrives.
        """
        cfg = self.cfg
        total = cfg.total_steps
        # Every check (run identity, checkpoint seals, config changes) happens before the first
        # write: a refusal leaves the run directory exactly as it was.
        plan = self.plan_start()
        self.run_id = plan["run_id"] if not plan["fresh"] else self._agree_run_id()
        self.acc.wait_for_everyone()
        if self.main:
            self._record_start(plan)
            self._rewrite_logs()
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.run_dir / "tb"))
            except ImportError:
                self.log("[warn] tensorboard is not installed: no TensorBoard scalars")
        start_step, t0 = self.step, time.time()
        seconds_before = self.history[-1]["seconds"] if self.history else 0.0
        bar = None
        if self.main and cfg.train.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=self.step, desc=cfg.name, unit="step", dynamic_ncols=True)
        # Step statistics summed on the device as one vector (a few ops per step, whatever the
        # number of statistics) and read once every log_every steps.
        running: torch.Tensor | None = None
        running_names: tuple[str, ...] = ()
        running_steps = 0
        it = iter(self.stream)
        with _Signals() as sig:
            while self.step < total:
                losses = self.train_step(next(it))
                with torch.no_grad():
                    stats = torch.stack([v.float() for v in losses.values()])
                if running is None or tuple(losses) != running_names:  # e.g. warm-up ended
                    running, running_names, running_steps = stats, tuple(losses), 0
                else:
                    running = running + stats
                running_steps += 1
                if bar is not None:
                    bar.update(1)
                if self.step % cfg.train.log_every == 0:
                    avg = dict(zip(running_names, (running / running_steps).tolist()))
                    running = None
                    if bar is not None:
                        bar.set_postfix(loss=f"{avg['loss']:.3f}", lr=f"{self.scheduler.get_last_lr()[0]:.2g}")
                    if hasattr(self.stream, "skipped"):  # data.on_corrupt=skip: images skipped so far
                        avg["corrupt_skipped"] = self.stream.skipped
                    self._log_scalars("train", avg)
                if self.step % cfg.train.eval_every == 0 or self.step == total:
                    row = self.evaluate()
                    row["seconds"] = seconds_before + time.time() - t0
                    self.history.append(row)
                    self._append_metrics(row)
                stop = self._agree_stop(sig.received)
                if self.step % cfg.train.checkpoint_every == 0 or self.step == total or stop:
                    self.save_checkpoint()
                if stop:
                    if bar is not None:
                        bar.close()
                    code = EXIT_INTERRUPTED if sig.received == signal.SIGINT else EXIT_PREEMPTED
                    self.log(f"[signal] stopped at step {self.step} after writing a checkpoint (exit {code})")
                    raise SystemExit(code)
        if bar is not None:
            bar.close()
        if self.tb is not None:
            self.tb.close()
        self.log(f"[done] {self.step - start_step} steps in {time.time() - t0:.1f}s")
        return self.finalize() if self.main else None

    def _agree_stop(self, received: int | None) -> bool:
        """All ranks stop at the same step if any rank got a signal."""
        return self.coll.any_true(received is not None)

    # ------------------------------------------------------------------ outputs
    def _log_scalars(self, prefix: str, values: dict[str, float]) -> None:
        if not self.main:
            return
        with open(self.run_dir / "train.jsonl", "a") as f:
            f.write(json.dumps({"step": self.step, **values}) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"{prefix}/{k}", v, self.step)

    def _append_metrics(self, row: dict[str, Any]) -> None:
        if not self.main:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ("step",):
                    self.tb.add_scalar(f"eval/{k}", v, self.step)

    def _rewrite_logs(self) -> None:
        """After a resume, make the logs end at the checkpoint's step (the rest will be redone)."""
        (self.run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in self.history))
        train_log = self.run_dir / "train.jsonl"
        if train_log.exists():
            rows = [json.loads(line) for line in train_log.read_text().splitlines() if line.strip()]
            train_log.write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= self.step))

    def finalize(self) -> dict[str, Any]:
        """Apply the evaluation protocol to the history, write ``final.json`` and print the table."""
        from bmb.protocols import select_result

        result = select_result(self.history, self.cfg.train.eval_protocol, val_split=self.cfg.data.val_split)
        if self.device.type == "cuda":
            result["max_gpu_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        result.update({"steps": self.step, "seconds": self.history[-1]["seconds"] if self.history else 0.0,
                       "algorithm": self.cfg.method.algorithm, "name": self.cfg.name,
                       "labeled_counts": self.labeled_counts.tolist(), "class_names": self.class_names,
                       "many_above": self.thresholds[0], "few_at_most": self.thresholds[1],
                       "run_id": self.run_id})
        (self.run_dir / "final.json").write_text(json.dumps(result, indent=2) + "\n")
        rundir.append_history(self.run_dir, "finish", self.run_id, step=self.step)
        self.log(format_table(result))
        return result


def format_table(result: dict[str, Any]) -> str:
    """The per-class recall table printed at the end of a run."""
    lines = [f"\n{result['name']} ({result['algorithm']}, {result['steps']} steps, {result['protocol']})",
             "| class | labeled | recall |", "|---|---:|---:|"]
    for name, n, r in zip(result["class_names"], result["labeled_counts"], result["per_class_recall"]):
        lines.append(f"| {name} | {n} | {100 * r:.1f} |")
    lines.append(f"top-1 {100 * result['top1']:.2f}  mean recall {100 * result['mean_recall']:.2f}  "
                 f"many {100 * result['many']:.1f}  medium {100 * result['medium']:.1f}  few {100 * result['few']:.1f}"
                 f"  (many: >{result['many_above']} labeled, few: <={result['few_at_most']})")
    return "\n".join(lines)
