"""The training loop (devices and processes through ``accelerate``; resumable exactly).

Single process: ``rsrefseg train --config C.yaml``. Several GPUs / nodes (data-parallel):
``accelerate launch [--config_file ACC.yaml] -m rsrefseg train --config C.yaml``.

Exact resumption: a checkpoint is written only between optimizer steps and holds the trained part,
the optimizer, the scheduler, the grad scaler, every process's RNG states and the data position
(epoch, micro-batch). The data order comes from :class:`EpochBatchSampler` (seeded per epoch, no
global RNG), augmentation from per-sample seeds, so a run killed at any point and resumed
continues with exactly the losses of an uninterrupted run (CPU, ``num_workers=0``).
"""

from __future__ import annotations

import contextlib
import csv
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from rsrefseg.data.datasets import collate_fn
from rsrefseg.data.grouping import collate_grouped
from rsrefseg.errors import RSRefSegError
from rsrefseg.evaluation import evaluate
from rsrefseg.modeling.checkpointing import enable_gradient_checkpointing
from rsrefseg.modeling.optimize import fast_kernels
from rsrefseg.training.data import AugmentedView, EpochBatchSampler
from rsrefseg.training.losses import activation_loss, segmentation_loss
from rsrefseg.training.schedule import make_schedule, make_scheduler, steps_per_epoch
from rsrefseg.training.setup import (
    build_datasets,
    build_optimizer,
    check_distributed,
    make_accelerator,
    model_config,
    oom_message,
    write_final_report,
)
from rsrefseg.training.state import (
    TrainerState,
    apply_resumable,
    prepare_checkpoint_root,
    prune_checkpoints,
    read_resumable,
    resolve_resume,
    save_best,
    save_resumable,
)
from rsrefseg.training.state_files import check_storable
from rsrefseg.training.train_config import TrainConfig, dump_config
from rsrefseg.utils import atomic_write_text, check_output_dir, remove_stale_temp_files

SUMMARY_KEYS = ("n", "mIoU", "oIoU", "Pr@0.5", "Pr@0.6", "Pr@0.7", "Pr@0.8", "Pr@0.9")


class TrainingOOMError(RSRefSegError):
    """A batch did not fit in memory; the message says what to lower."""


class LossModule(torch.nn.Module):
    """The model plus its loss, returning a plain scalar tensor.

    This is what ``accelerator.prepare`` wraps (DDP/FSDP/DeepSpeed): distributed wrappers look for
    tensors in the forward output to find unused parameters and cannot see inside
    ``RSRefSegOutput``; the loss is computed inside the wrapped forward instead.
    """

    def __init__(self, model: torch.nn.Module, bce_weight: float, dice_weight: float,
                 activation_weight: float = 0.0) -> None:
        super().__init__()
        self.model, self.bce_weight, self.dice_weight = model, bce_weight, dice_weight
        self.activation_weight = activation_weight

    def forward(self, pixel_values: torch.Tensor, texts: list[str], target: torch.Tensor,
                image_index: torch.Tensor | None = None) -> torch.Tensor:
        """``B x 3 x S x S`` images in [0, 255], ``T`` expressions, ``T x 1 x S x S`` labels -> loss.

        ``image_index`` (``T``): the image of each expression (grouped batches: each image encoded
        once); None = expression i on image i (``T == B``). The loss is the mean over the ``T``
        expressions either way.
        """
        out = self.model(pixel_values, texts, image_index)
        loss, _ = segmentation_loss(out.mask_logits, target, self.bce_weight, self.dice_weight)
        if self.activation_weight > 0:
            loss = loss + self.activation_weight * activation_loss(out.global_activation, target)
        return loss


@dataclass
class TrainResult:
    """What :func:`train` did."""

    work_dir: Path
    state: TrainerState
    #: "done" (all epochs), "time" (max_minutes spent) or "max_steps".
    stopped_by: str
    last_checkpoint: Path | None = None
    best_checkpoint: Path | None = None
    last_metrics: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


class _LossLog:
    """Per-step CSV (``step, epoch, loss, lr``); on resume rows after the checkpoint's step are dropped."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and path.is_file():
            with path.open(newline="", encoding="utf-8") as handle:
                kept = [r for r in csv.reader(handle)][1:]
            kept = [r for r in kept if r and int(r[0]) <= resume_step]
            text = "step,epoch,loss,lr\n" + "".join(",".join(r) + "\n" for r in kept)
            atomic_write_text(path, text)
        else:
            atomic_write_text(path, "step,epoch,loss,lr\n")
        self.handle = path.open("a", encoding="utf-8")

    def write(self, step: int, epoch: int, loss: float, lr: float) -> None:
        self.handle.write(f"{step},{epoch},{loss:.9g},{lr:.9g}\n")
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


def train(
    config: TrainConfig,
    resume: str | None = None,
    accelerator: Any | None = None,
    step_callback: Callable[[TrainerState, Any], None] | None = None,
) -> TrainResult:
    """Train (or resume) a run described by ``config``; returns a :class:`TrainResult`.

    Args:
        resume: None (fresh run; refuses a work dir that already holds checkpoints), ``"auto"``
            (the newest checkpoint of ``work_dir``, fresh start if none), or a checkpoint folder.
        accelerator: an ``Accelerator`` to use (default: one made from the config).
        step_callback: called on every process after each optimizer step with the trainer state
            and the unwrapped model (monitoring, tests).
    """
    session_start = time.monotonic()  # max_minutes counts from here (data caching included)
    threads_before = torch.get_num_threads()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    try:
        return _train(config, resume, accelerator, step_callback, session_start)
    finally:
        torch.set_num_threads(threads_before)


def _train(
    config: TrainConfig,
    resume: str | None,
    accelerator: Any | None,
    step_callback: Callable[[TrainerState, Any], None] | None,
    session_start: float,
) -> TrainResult:
    """The body of :func:`train` (``num_threads`` already applied)."""
    from accelerate.utils import set_seed

    from rsrefseg.build import build_from_preset

    accelerator = accelerator or make_accelerator(config)
    check_distributed(accelerator)  # DeepSpeed / FSDP refused before anything is built
    main = accelerator.is_main_process
    work_dir = Path(config.work_dir)
    ckpt_root = work_dir / "checkpoints"
    check_output_dir(work_dir, "work_dir")  # an existing file or a read-only place: fail before any work
    resume_dir = resolve_resume(resume, work_dir) if resume else None
    if resume is None and any(ckpt_root.glob("step-*")):
        raise RSRefSegError(f"{ckpt_root} already holds checkpoints; pass --resume auto to continue "
                            "or choose another --work_dir")
    # Read (and check) the resumable state now: a bad or foreign folder fails before data and model.
    resume_files = read_resumable(resume_dir, accelerator) if resume_dir is not None else None
    mcfg = model_config(config)
    if main:
        prepare_checkpoint_root(ckpt_root)  # an interrupted `best` swap repaired, temp folders of a killed run gone
        cache_dir = Path(config.data.cache_dir) if config.data.cache_dir else work_dir / "cache"
        for folder, deep in ((work_dir, False), (work_dir / "logs", True), (work_dir / "report", True),
                             (cache_dir, False)):
            remove_stale_temp_files(folder, recursive=deep)  # only our temp names whose writer is gone
    train_ds, val_ds, train_base, val_base = build_datasets(config, mcfg, accelerator)  # records checked first

    set_seed(config.seed)
    model = build_from_preset(config.model.preset, base=config.model.base, clip=config.model.clip,
                              sam=config.model.sam, random_init=config.model.random_init, **config.model.overrides)
    model.train()
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    set_seed(config.seed + accelerator.process_index)  # distinct dropout per process
    net = model  # the RSRefSeg itself: saved, validated and reported
    optimizer = build_optimizer(net, config)
    grouped = config.data.expressions_per_image > 1
    sampler = EpochBatchSampler(len(train_ds), config.batch_size, config.seed, True,
                                accelerator.process_index, accelerator.num_processes,
                                image_keys=[r.file_name for r in train_ds.records] if grouped else None,
                                per_image=config.data.expressions_per_image)
    steps_epoch = steps_per_epoch(len(sampler), config.grad_accum)
    s = config.schedule
    schedule = make_schedule(s.epochs, steps_epoch, s.warmup_epochs, s.warmup_steps, s.start_factor, s.min_factor)
    scheduler = make_scheduler(optimizer, schedule)
    loss_module = LossModule(net, config.loss.bce_weight, config.loss.dice_weight, config.loss.activation_weight)
    model, optimizer = accelerator.prepare(loss_module, optimizer)
    check_storable(optimizer.state_dict(), "optimizer state")  # before any step: refused now, not at a checkpoint
    view = AugmentedView(train_ds, config.data.flip_h, config.data.flip_v)

    state = TrainerState()
    if resume_files is not None:
        state = apply_resumable(resume_files, accelerator, net, optimizer, scheduler)  # restores RNG last
        del resume_files  # the model/optimizer tensors now live in the model and optimizer
        if main:
            print(f"resumed from {resume_dir} (epoch {state.epoch + 1}, batch {state.batch_in_epoch}, "
                  f"step {state.global_step})")
    if main:  # every input checked (config, data, resumable state): the run's own files start here
        work_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(work_dir / "config.yaml", dump_config(config))
    log = _LossLog(work_dir / "logs" / "losses.csv", state.global_step if resume_dir else None) if main else None
    writer = None
    if main and config.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(work_dir / "logs" / "tensorboard"), purge_step=state.global_step + 1)
    bar = None
    if main and config.progress:
        from tqdm import tqdm

        bar = tqdm(total=schedule.total_steps, initial=state.global_step, desc="train", unit="step",
                   dynamic_ncols=True)

    trainable = [p for p in net.parameters() if p.requires_grad]
    budget = config.max_minutes * 60.0 if config.max_minutes else None
    elapsed_before = state.elapsed_s
    stopped_by = "done"
    last_metrics: dict[str, Any] = {}
    last_saved: Path | None = None

    def validate() -> dict[str, Any]:
        nonlocal last_metrics
        with fast_kernels(net):  # the kernels of `rsrefseg eval` (LoRA unmerged), then the training ones
            result = evaluate(net, val_ds, config.val_batch_size, accelerator, config.num_workers,
                              progress=config.progress, desc="val")
        summary = {k: result.metrics[k] for k in SUMMARY_KEYS if k in result.metrics}
        done = state.epoch + state.batch_in_epoch / len(sampler)  # epochs completed (fractional if mid-epoch)
        state.history.append({"epoch": done, "step": state.global_step, **summary})
        last_metrics = result.metrics
        if summary["mIoU"] > state.best_miou:
            state.best_miou, state.best_step, state.best_epoch = summary["mIoU"], state.global_step, state.epoch
            if main:
                save_best(ckpt_root, net, {"step": state.global_step, "epochs_done": done, **summary})
        accelerator.wait_for_everyone()
        if main:
            if writer is not None:
                for key, value in summary.items():
                    if key != "n":
                        writer.add_scalar(f"val/{key}", value, state.global_step)
            message = (f"val after {done:g} epoch(s) (step {state.global_step}): "
                       f"mIoU {100 * summary['mIoU']:.2f}  oIoU {100 * summary['oIoU']:.2f}  "
                       f"Pr@0.5 {100 * summary['Pr@0.5']:.2f}  (best mIoU {100 * state.best_miou:.2f})")
            (bar.write if bar is not None else print)(message)
        return summary

    def checkpoint() -> Path:
        state.elapsed_s = elapsed_before + time.monotonic() - session_start
        path = save_resumable(ckpt_root, accelerator, net, optimizer, scheduler, state,
                              extra={"epoch": state.epoch, "step": state.global_step})
        if main:
            prune_checkpoints(ckpt_root, config.keep_last)
        return path

    def should_stop() -> str:
        """"time" / "max_steps" when a budget is spent (the same answer on every process), else "done"."""
        if budget is not None and time.monotonic() - session_start >= budget:
            accelerator.set_trigger()
        if accelerator.check_trigger():
            return "time"
        if config.max_steps is not None and state.global_step >= config.max_steps:
            return "max_steps"
        return "done"

    try:
        if config.max_steps is not None and state.global_step >= config.max_steps:
            stopped_by = "max_steps"  # resumed a run that already reached max_steps
        for epoch in range(state.epoch, s.epochs if stopped_by == "done" else state.epoch):
            state.epoch = epoch
            sampler.set_epoch(epoch, state.batch_in_epoch)
            loader = DataLoader(view, batch_sampler=sampler, collate_fn=collate_grouped if grouped else collate_fn,
                                num_workers=config.num_workers,
                                generator=torch.Generator())  # the global RNG is never consumed here
            batches = iter(loader)
            n_batches = len(sampler)
            while state.batch_in_epoch < n_batches:
                group = min(config.grad_accum, n_batches - state.batch_in_epoch)
                lr = optimizer.param_groups[0]["lr"]
                total = torch.zeros((), device=accelerator.device)
                try:
                    for k in range(group):
                        batch = next(batches)
                        sync = contextlib.nullcontext() if k == group - 1 else accelerator.no_sync(model)
                        with sync:
                            with accelerator.autocast():
                                index = batch.get("image_index")  # grouped: U images, T expressions
                                loss = model(batch["pixel_values"].to(accelerator.device).float(), batch["text"],
                                             batch["mask"].to(accelerator.device),
                                             None if index is None else index.to(accelerator.device))
                            accelerator.backward(loss / group)
                        total += loss.detach() / group
                    if config.grad_clip:
                        accelerator.clip_grad_norm_(trainable, config.grad_clip)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                except Exception as exc:
                    if _is_oom(exc):
                        raise TrainingOOMError(oom_message(config, mcfg)) from None
                    raise
                state.batch_in_epoch += group
                state.global_step += 1
                step_loss = float(accelerator.reduce(total, "mean"))
                if step_callback is not None:
                    step_callback(state, net)
                if main:
                    assert log is not None
                    log.write(state.global_step, epoch, step_loss, lr)
                    if writer is not None and state.global_step % config.log_every == 0:
                        writer.add_scalar("train/loss", step_loss, state.global_step)
                        writer.add_scalar("train/lr", lr, state.global_step)
                    if bar is not None:
                        bar.set_postfix(epoch=epoch + 1, loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
                        bar.update(1)
                stopped_by = should_stop()
                if stopped_by != "done":
                    break
                every = config.checkpoint_every_steps
                if every and state.global_step % every == 0 and state.batch_in_epoch < n_batches:
                    last_saved = checkpoint()
            if state.batch_in_epoch >= n_batches:  # epoch complete
                state.epoch, state.batch_in_epoch = epoch + 1, 0
                if (epoch + 1) % config.val_every == 0 or epoch + 1 == s.epochs or stopped_by != "done":
                    validate()
                last_saved = checkpoint()
            if stopped_by != "done":
                break
        validated = bool(state.history) and state.history[-1]["step"] == state.global_step
        if stopped_by != "done" and state.batch_in_epoch > 0 and not validated:  # stopped mid-epoch
            validate()
            last_saved = checkpoint()
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
        if writer is not None:
            writer.close()

    result = TrainResult(work_dir, state, stopped_by, last_saved,
                         ckpt_root / "best" if (ckpt_root / "best").is_dir() else None, last_metrics)
    if main:
        result.report = write_final_report(config, net, accelerator, state, last_metrics, train_base, val_base,
                                           val_ds, ckpt_root)
    accelerator.wait_for_everyone()
    return result
