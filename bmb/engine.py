"""The training loop: one object that runs steps, evaluates, logs and checkpoints.

It is handed everything it trains with (model, algorithm, input stream, view maker, evaluation
sources) by ``launch/train.py``, so it knows nothing about where data comes from. Accelerate
supplies the device, mixed precision and DDP/DeepSpeed wrapping.

Run directory (``train.out_dir/name``)::

    config.yaml        the resolved config
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
from bmb.algorithms import Algorithm, StepOutputs
from bmb.config import Config, config_to_dict, dump_config
from bmb.dist import Collectives
from bmb.ema import ModelEMA
from bmb.metrics import ConfusionMatrix, default_thresholds, group_recall, mean_recall, shot_groups

# Exit codes the SLURM scripts understand.
EXIT_PREEMPTED = 3  # SIGTERM / SIGUSR1: checkpoint written, please requeue
EXIT_INTERRUPTED = 130  # SIGINT (Ctrl-C): checkpoint written, stop


def build_optimizer(cfg: Config, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay)


def lr_lambda(cfg: Config) -> Callable[[int], float]:
    """Multiplier of the base lr at a step: linear warm-up, then constant or cosine to 0."""
    total, warm, cosine = cfg.total_steps, cfg.optim.warmup_steps, cfg.optim.schedule == "cosine"

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if not cosine:
            return 1.0
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

        optimizer = build_optimizer(cfg, model.parameters())
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
    def _rank_state(self) -> dict[str, Any]:
        return {"stream": self.stream.state_dict(), "aug_gen": self.aug_gen.get_state(),
                "optimizer": self.optimizer.state_dict() if self.deepspeed else None,
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state() if self.device.type == "cuda" else None}

    def save_checkpoint(self) -> None:
        """All ranks call this; rank files first, then rank 0's main file (its presence = complete)."""
        self.acc.wait_for_everyone()
        if self.coll.rank > 0:
            ckpt.atomic_save(self._rank_state(), ckpt.rank_path(self.ckpt_dir, self.step, self.coll.rank))
        self.acc.wait_for_everyone()
        if self.main:
            state = {
                "step": self.step, "world_size": self.coll.world_size, "config": config_to_dict(self.cfg),
                "model": self.raw_model.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": None if self.deepspeed else self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "algorithm": self.algorithm.extra_state(), "history": self.history,
                "get_hist": self.get_hist.cpu().clone(), "rank0": self._rank_state(),
            }
            ckpt.atomic_save(state, ckpt.main_path(self.ckpt_dir, self.step))
            ckpt.prune(self.ckpt_dir, self.cfg.train.keep_checkpoints)
        self.acc.wait_for_everyone()

    def maybe_resume(self) -> bool:
        """Restore the newest complete checkpoint per ``train.resume``; True if one was loaded."""
        mode = self.cfg.train.resume
        if mode == "none":
            return False
        if mode == "auto":
            folder = self.ckpt_dir
            found = ckpt.load_complete(folder, self.coll.rank, warn=self.log)
            if found is None:
                return False
            main, mine = found
        else:
            path = Path(mode)
            if not path.is_file():
                raise FileNotFoundError(f"train.resume: checkpoint file not found: {path}")
            folder = path.parent
            main = torch.load(path, map_location="cpu", weights_only=False)
            mine = None
            if self.coll.rank > 0:
                mine = torch.load(ckpt.rank_path(folder, main["step"], self.coll.rank), map_location="cpu",
                                  weights_only=False)
        if main["world_size"] != self.coll.world_size:
            raise ValueError(f"checkpoint step {main['step']} was written by {main['world_size']} processes, "
                             f"this run has {self.coll.world_size}; resume with the same number")
        self.raw_model.load_state_dict(main["model"])  # before the optimizer: ZeRO refreshes its masters from it
        self.ema.load_state_dict(main["ema"])
        if self.deepspeed:
            parts = [main["rank0"]["optimizer"]] + [
                torch.load(ckpt.rank_path(folder, main["step"], r), map_location="cpu", weights_only=False)["optimizer"]
                for r in range(1, self.coll.world_size)]
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
        self.log(f"[resume] from {ckpt.main_path(self.ckpt_dir, self.step)} at step {self.step}")
        return True

    # ------------------------------------------------------------------ one step
    def train_step(self, batch: Any) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        self.model.train()
        lw, uw, strong = self.views(batch.labeled, batch.unlabeled, self.aug_gen)
        bl, bu, k = lw.shape[0], uw.shape[0], len(strong)
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
        got = getattr(self.algorithm, "last_get", None)
        if got is not None:  # (labels, valid) of the items drawn from the bank this step
            labels, valid = got
            self.get_hist.scatter_add_(0, labels.to(self.device), valid.to(self.device, torch.long))
            self.algorithm.last_get = None
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
        bank = getattr(self.algorithm, "bank", None)
        if bank is not None:
            row["bank_class_counts"] = bank.class_counts().cpu().tolist()
            row["get_class_counts"] = self.get_hist.cpu().tolist()
            row["nhat"] = self.algorithm.estimator.value().tolist()
        return row

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict[str, Any] | None:
        """Train to ``total_steps`` (resuming if configured); returns the final result on rank 0.

        Raises ``SystemExit`` with :data:`EXIT_PREEMPTED` / :data:`EXIT_INTERRUPTED` after writing a
        checkpoint when a signal arrives.
        """
        cfg = self.cfg
        total = cfg.total_steps
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.run_dir / "config.yaml")
        self.acc.wait_for_everyone()
        self.maybe_resume()
        if self.main:
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
                       "many_above": self.thresholds[0], "few_at_most": self.thresholds[1]})
        (self.run_dir / "final.json").write_text(json.dumps(result, indent=2) + "\n")
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
