"""The training loop: one object that runs steps and, at their cadences, evaluates, logs and
checkpoints, each through its own module.

It is handed everything it trains with (model, algorithm, input stream, view maker, evaluation
sources) by ``launch/train.py``, so it knows nothing about where data comes from. Accelerate
supplies the device, mixed precision and DDP/DeepSpeed wrapping.

=================== ==========================================================================
``bmb.optim``       the optimizer and the lr schedule
``bmb.checkpointer`` checkpoint save and resume of the run's parts; how a run starts: ``bmb.rundir``
``bmb.evaluate``    confusion matrices, the metrics row, the protocol result, the table
``bmb.logs``        ``train.jsonl``, ``metrics.jsonl``, the experiment trackers (TensorBoard ...)
``bmb.export``      the final EMA model as safetensors + ``model.json`` + a model card
=================== ==========================================================================

Run directory (``train.out_dir/name``)::

    config.yaml        the resolved config (written once the start/resume checks pass: the truth)
    run.json           run id and the config the run was started with (bmb.rundir)
    history.jsonl      start / resume / config_change / finish events (bmb.rundir)
    metrics.jsonl      one JSON object per evaluation
    train.jsonl        training scalars (means over the ranks) and the lr every ``log_every`` steps
    final.json         the result under the configured protocol
    checkpoints/       see bmb.checkpoint
    export/            the final EMA model: model.safetensors, model.json, config.json, README.md (bmb.export)
    tb/                TensorBoard scalars (``train.trackers``, see bmb.logs)
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bmb import guards, rundir
from bmb.algorithms import Algorithm, StepOutputs
from bmb.checkpointer import Checkpointer, Part, Reader, optimizer_parts, rng_parts
from bmb.config import Config, config_to_dict
from bmb.dist import Collectives
from bmb.ema import ModelEMA
from bmb.evaluate import Evaluator, final_result, format_table, shot_thresholds
from bmb.export import write_export
from bmb.guards import named_tensors
from bmb.logs import RunLogs
from bmb.metrics import shot_groups
from bmb.optim import build_optimizer, lr_lambda, retune

__all__ = ["EXIT_INTERRUPTED", "EXIT_PREEMPTED", "Trainer", "build_optimizer", "lr_lambda"]

# Exit codes the SLURM scripts understand.
EXIT_PREEMPTED = 3  # SIGTERM / SIGUSR1: checkpoint written, please requeue
EXIT_INTERRUPTED = 130  # SIGINT (Ctrl-C): checkpoint written, stop


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
            floats, with ``.eval(u8) -> float`` for evaluation; in a distributed run also called
            with ``part=(rank, world)`` (:class:`pipelines.augment.ViewMaker`: this rank's slice
            of the views of the global batch).
        eval_sources: split name -> evaluation source for this rank (yields ``(images, labels[, valid])``).
        labeled_counts: ``(C,)`` labeled class counts (many/medium/few and weights).
        class_names: for the printed table.
        run_dir: where everything is written.
    """

    def __init__(self, cfg: Config, accelerator: Any, model: nn.Module, algorithm: Algorithm,
                 stream: Any, views: Any, eval_sources: dict[str, Any], labeled_counts: torch.Tensor,
                 class_names: list[str], run_dir: str | Path, log: Callable[[str], None] = print,
                 dataset_build_id: str | None = None) -> None:
        self.cfg, self.acc, self.algorithm = cfg, accelerator, algorithm
        self.stream, self.views, self.eval_sources = stream, views, eval_sources
        self.labeled_counts = torch.as_tensor(labeled_counts)
        self.class_names = class_names
        self.run_dir = Path(run_dir)
        self.dataset_build_id = dataset_build_id  # the manifest's build_id: checkpointed, compared on resume
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
            per_rank = max(cfg.train.labeled_batch // accelerator.num_processes, 1)
            ds.deepspeed_config["train_micro_batch_size_per_gpu"] = per_rank
        # The schedule is not handed to Accelerate: its AcceleratedScheduler steps a scheduler
        # num_processes times per step (its convention for per-process batches), while our
        # batches are global. We step it once per training step (train_step).
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.scheduler = scheduler
        self.last_lr = scheduler.get_last_lr()[0]  # the lr of the latest step (logged)
        self.algorithm.to(self.device)
        self.ema = ModelEMA(self.raw_model, cfg.train.ema_decay)
        # Identical on every rank, as the bank's generator (inside the algorithm): each rank draws
        # the global batch's view parameters and keeps its slice's (views(part=...)), so the
        # views, like everything else of a step, do not depend on the world size.
        self.aug_gen = torch.Generator().manual_seed(cfg.train.seed * 1000 + 17)
        self.step = 0
        self.run_id: str | None = None  # set by fit(): a new id, or the resumed checkpoint's
        self.history: list[dict[str, Any]] = []  # the metrics rows so far (checkpointed)
        self.thresholds = shot_thresholds(cfg, self.labeled_counts)
        self.groups = shot_groups(self.labeled_counts, *self.thresholds)
        self.get_hist = torch.zeros(len(class_names), dtype=torch.long, device=self.device)
        self.checkpoints = Checkpointer(*self.checkpoint_parts(), rundir.RunDir(self.run_dir, self.log), self.coll,
                                        accelerator.wait_for_everyone, config_to_dict(cfg),
                                        cfg.train.keep_checkpoints, dataset_build_id, log=self.log)
        self.watch = guards.LossWatch()  # the first non-finite loss (bmb.guards)
        self.logs = RunLogs(self.run_dir, accelerator)
        self.evaluator = Evaluator(cfg, eval_sources, lambda images: views.eval(images.to(self.device)), self.groups,
                                   len(class_names), self.coll.all_reduce_sum, self.device, accelerator.autocast)

    @property
    def raw_model(self) -> nn.Module:
        return self.acc.unwrap_model(self.model)

    # ------------------------------------------------------------------ checkpointed state
    def checkpoint_parts(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """What a checkpoint holds: ``(shared parts, per-rank parts)`` by name (the checkpoint's
        keys; see :mod:`bmb.checkpointer`). A new piece of state is one more entry here."""
        shared_opt, rank_opt = optimizer_parts(self.optimizer, self.deepspeed)
        shared = {"trainer": self, "model": Part(lambda: self.raw_model.state_dict(), self.raw_model.load_state_dict),
                  "ema": self.ema, "optimizer": shared_opt, "scheduler": self.scheduler,
                  "algorithm": Part(self.algorithm.extra_state, self.algorithm.load_extra_state),
                  "get_hist": Part(lambda: self.get_hist.cpu().clone(), self._load_get_hist)}
        # The ZeRO optimizer first: at another world size its refusal is named before the reader's.
        per_rank = {"optimizer": rank_opt, "stream": Reader(self.stream),
                    "aug_gen": Part(self.aug_gen.get_state, self.aug_gen.set_state), **rng_parts(self.device)}
        return shared, per_rank

    def state_dict(self) -> dict[str, Any]:
        """The trainer's own part: its step and the evaluation history."""
        return {"step": self.step, "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state["history"])
        self.step = int(state["step"])

    def _load_get_hist(self, counts: torch.Tensor) -> None:
        self.get_hist = counts.to(self.device).clone()

    def _written_tensors(self) -> Any:
        """What a checkpoint and the export hold, as named tensors (for the divergence guard)."""
        yield from named_tensors(self.raw_model.state_dict(), "model.")
        yield from named_tensors(self.ema.module.state_dict(), "ema.")
        opt = self.checkpoints.parts["optimizer"].state_dict()  # None under ZeRO: its state is DeepSpeed's
        if opt is not None:
            yield from named_tensors(opt["state"], "optimizer.")
        yield from named_tensors(self.algorithm.extra_state(), "algorithm.")

    def check_finite(self, agree: bool = True) -> None:
        """Raise :class:`bmb.guards.DivergedError` before anything non-finite is written."""
        guards.check_state(self._written_tensors(), self.step, self.coll, self.watch if agree else None, agree)

    def save_checkpoint(self) -> None:
        """Every rank: write this step's checkpoint (see :class:`bmb.checkpointer.Checkpointer`)."""
        self.checkpoints.save()

    def retune(self) -> None:
        """After an opted-in config change on resume: the hyperparameters the restored state carries
        (the optimizer's lr and decay, the schedule's base lr, the bank's powers, the EMA decay)
        take the requested values, so that the run does what ``config.yaml`` says."""
        retune(self.optimizer, self.scheduler, self.cfg)
        self.algorithm.retune(self.cfg.method)
        self.ema.decay = self.cfg.train.ema_decay

    # ------------------------------------------------------------------ one step
    def train_step(self, batch: Any) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        self.model.train()
        made = getattr(batch, "views", None)  # data.views=loader: the loader made them (ViewBatch)
        part = {"part": (self.coll.rank, self.coll.world_size)} if self.coll.active else {}
        lw, uw, strong = made if made is not None else self.views(batch.labeled, batch.unlabeled, self.aug_gen, **part)
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
        self.last_lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        # Once per step on every rank, whatever the world size; also after an fp16 step that the
        # loss scaler skipped, so that the schedule stays a function of the step (ends at total_steps).
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
    def evaluate(self) -> dict[str, Any]:
        """Evaluate every split; returns one metrics row (with the reader's and the algorithm's
        statistics: skipped images, the bank's histogram, N-hat, the trainer's get histogram).

        Every rank evaluates rank 0's model (the one checkpointed and exported): batch-norm
        statistics move with each rank's own batch, so the ranks' buffers are made rank 0's first."""
        self.coll.broadcast_([*self.ema.module.buffers(), *self.raw_model.buffers()])
        row = self.evaluator.row(self.step, self.ema.module, self.raw_model, self.algorithm.eval_head)
        if hasattr(self.stream, "skipped"):  # corrupt training images skipped so far (this rank)
            row["corrupt_skipped"] = self.stream.skipped
        row.update(self.evaluator.corrupt_skipped())  # ... and in this evaluation's passes
        stats = self.algorithm.eval_stats()
        if stats:  # BMB: the bank's histogram and N-hat, with the trainer's get histogram
            row.update(stats)
            row["get_class_counts"] = self.get_hist.cpu().tolist()
        return row

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict[str, Any] | None:
        """Train to ``total_steps`` (resuming if configured); returns the final result on rank 0.

        Raises ``SystemExit`` with :data:`EXIT_PREEMPTED` / :data:`EXIT_INTERRUPTED` after writing a
        checkpoint when a signal arrives, and :class:`bmb.guards.DivergedError` (every rank) when
        the loss or a weight goes non-finite, before it is checkpointed.
        """
        cfg = self.cfg
        total = cfg.total_steps
        plan = self.checkpoints.start(cfg)  # refuses (RunDirError) before writing anything; may resume
        self.run_id = self.checkpoints.run_id
        if plan.retune:
            self.retune()
        self.logs.start(self.history, self.step, cfg)
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
                self.watch.observe(self.step, tuple(losses), stats)  # on the device: no sync
                if running is None or tuple(losses) != running_names:  # e.g. warm-up ended
                    running, running_names, running_steps = stats, tuple(losses), 0
                else:
                    running = running + stats
                running_steps += 1
                if bar is not None:
                    bar.update(1)
                if self.step % cfg.train.log_every == 0:
                    self.watch.check(self.coll)  # DivergedError on every rank
                    # The mean over ranks: the step's statistics over the global batch.
                    mean = self.coll.all_reduce_sum(running) / (running_steps * self.coll.world_size)
                    avg = dict(zip(running_names, mean.tolist()))
                    avg["lr"] = self.last_lr
                    running = None
                    if bar is not None:
                        bar.set_postfix(loss=f"{avg['loss']:.3f}", lr=f"{self.last_lr:.2g}")
                    if hasattr(self.stream, "skipped"):  # data.on_corrupt=skip: images skipped so far
                        avg["corrupt_skipped"] = self.stream.skipped
                    self.logs.train(self.step, avg)
                if self.step % cfg.train.eval_every == 0 or self.step == total:
                    self.watch.check(self.coll)
                    row = self.evaluate()
                    row["seconds"] = seconds_before + time.time() - t0
                    self.history.append(row)
                    self.logs.metrics(row)
                stop = self._agree_stop(sig.received)
                if self.step % cfg.train.checkpoint_every == 0 or self.step == total or stop:
                    self.check_finite()  # nothing non-finite is checkpointed
                    self.checkpoints.save()
                if stop:
                    if bar is not None:
                        bar.close()
                    code = EXIT_INTERRUPTED if sig.received == signal.SIGINT else EXIT_PREEMPTED
                    self.log(f"[signal] stopped at step {self.step} after writing a checkpoint (exit {code})")
                    raise SystemExit(code)
        if bar is not None:
            bar.close()
        self.log(f"[done] {self.step - start_step} steps in {time.time() - t0:.1f}s")
        return self.finalize() if self.main else None

    def _agree_stop(self, received: int | None) -> bool:
        """All ranks stop at the same step if any rank got a signal."""
        return self.coll.any_true(received is not None)

    def finalize(self) -> dict[str, Any]:
        """Rank 0: apply the evaluation protocol to the history, write ``final.json`` and the
        evaluated (EMA) model's export (``export/``, see bmb.export), record the finish and print
        the table."""
        result = final_result(self.cfg, self.history, self.step, self.labeled_counts, self.class_names,
                              self.thresholds, self.run_id, self.device)
        self.check_finite(agree=False)  # nor exported
        (self.run_dir / "final.json").write_text(json.dumps(result, indent=2) + "\n")
        write_export(self.run_dir / "export", self.ema.module, cfg=self.cfg, eval_head=self.algorithm.eval_head,
                     class_names=self.class_names, labeled_counts=self.labeled_counts.tolist(),
                     thresholds=self.thresholds, result=result, history=self.history, step=self.step,
                     run_id=self.run_id)
        rundir.append_history(self.run_dir, "finish", self.run_id, step=self.step)
        self.log(format_table(result))
        return result
