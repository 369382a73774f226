"""Whole jobs built from the stages: `train` (the PPO run with its outputs around it: probe evaluations during
and after training, final/ with its model card, the report at the end)."""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path

from rlhflab.config import Config, save_config
from rlhflab.errors import Stopped, UserError
from rlhflab.evaluation.probes import eval_metrics, evaluate, format_table, load_probes, write_eval
from rlhflab.files import make_dir
from rlhflab.runs.checkpoint import latest_checkpoint, remove_partial_checkpoints
from rlhflab.runs.stopping import StopRequests
from rlhflab.runs.tracking import NullTracker, require_trackers, truncate_jsonl


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[bold]PPO"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("{task.fields[status]}"), transient=False)


def train(config: Config, out: str | Path, reward=None, resume: bool = False, quiet: bool = False):
    """Run PPO as configured; write metrics, samples, checkpoints and RUN_DIR/final. Returns the trainer.

    `reward` overrides config.reward.spec with any callable (prompts, completions, metadata) -> floats.
    A job's entry point, it sets process-wide state: the global random generators (seeded with train.seed)
    and malloc's reuse of freed memory (`keep_freed_memory`). Started by a launcher (`accelerate launch`,
    torchrun) it is one process of a data-parallel run: every process trains, process 0 writes the run's files
    and prints (distributed/processes.py).
    """
    from rich.console import Console
    from rich.markup import escape

    from rlhflab.evaluation.health import HealthMonitor, check_evaluation
    from rlhflab.distributed.processes import Processes
    from rlhflab.models.loading import keep_freed_memory
    from rlhflab.ppo.trainer import PPOTrainer
    from rlhflab.runs.seeding import seed_everything
    from rlhflab.runs.tracking import Tracker

    run_dir = Path(out)
    processes = Processes.from_environment(config.model.device)
    main = processes.is_main
    console = Console(stderr=True, quiet=quiet or not main)
    started = time.perf_counter()
    checkpoint = _start_run_dir(run_dir, resume, console, clean=main)
    probes = _load_probes(config)  # a bad probe file fails before minutes of model loading
    require_trackers(config.log.trackers)  # and so does a tracker that is not installed
    if main:
        make_dir(run_dir)
        save_config(config, run_dir / "config.yaml")  # first, so --resume works from the earliest kill
    processes.barrier()
    keep_freed_memory()  # large gradient and logit buffers stay in the heap between steps (9 % per iteration)
    seed_everything(config.train.seed)  # model init, sampling and shuffling; a resume restores the saved state
    trainer = PPOTrainer(config, run_dir, reward=reward, processes=processes)
    monitor = HealthMonitor(unchanged=frozenset(g.name for g in config.data.groups if g.expect == "unchanged"))
    trainer.checkpoint_extras["health"] = monitor  # a resumed run keeps its alarm baselines and streaks
    trainer.warn = lambda message: console.print(f"[yellow]warning[/]: {escape(message)}", highlight=False)
    if checkpoint is not None:
        trainer.resume()
        console.print(f"resumed {run_dir} at iteration {trainer.iteration}")
    elif main:  # a fresh run, or one stopped before its first checkpoint: logs start again at iteration 0
        for name in ("metrics.jsonl", "samples.jsonl"):
            truncate_jsonl(run_dir / name, 0)
    sampling = "; sampling from a bf16 copy" if trainer.sampling_copy else ""
    console.print(trainer.precision.log_line + sampling + ("" if processes.world_size == 1 else f"; {processes.kind}"))
    c = config
    tracker = Tracker(run_dir, c.log.trackers, c.log.project, c.log.run_name or run_dir.name, c.model_dump(mode="json"),
                      start_iteration=trainer.iteration) if main else NullTracker()
    console.print(f"model loaded in {time.perf_counter() - started:.0f} s; training {c.train.iterations} iterations "
                  f"of {c.rollout_batch_size} samples → {run_dir}")
    probe_hook = _probe_hook(probes, c) if probes is not None and c.eval.every > 0 else None

    def warn(row: dict, notes=None) -> None:
        for note in monitor.update(row) if notes is None else notes:
            console.print(f"[yellow]warning[/]: {note.message} — likely cause: {note.cause}; fix: {note.fix}")

    stop = StopRequests("the current iteration")
    status = "FAILED"  # what the trackers' runs end as, unless the loop gets through
    try:
        with stop, _progress() if not quiet else _NoProgress() as progress:
            task = progress.add_task("train", total=c.train.iterations, completed=trainer.iteration, status="")
            # every process stops after the same iteration, whichever of them the signal reached first
            while trainer.iteration < c.train.iterations and not processes.any(stop.requested):
                m = trainer.iteration_step(tracker, extra_metrics=probe_hook, on_row=warn)
                progress.update(task, advance=1, status=(
                    f"reward {m['objective/scores']:.3f}  KL {m['objective/kl']:.2f}  {m['time/iteration']:.1f} s/it"
                    + group_status(m)))
        if c.train.checkpoint_every == 0 or trainer.iteration % c.train.checkpoint_every:
            trainer.save()  # the last iteration reached, also when stopped by a signal
        stopped = processes.any(stop.requested)
        status = "KILLED" if stopped else "FINISHED"
    except KeyboardInterrupt:  # a second Ctrl-C
        status = "KILLED"
        raise
    finally:
        tracker.close(status)
    if stopped:
        saved = "checkpoint saved" if trainer.iteration else "nothing to save yet"
        signal_name, code = (stop.signal.name, stop.exit_code) if stop.requested else ("another process", 143)
        raise Stopped(f"stopped by {signal_name} at iteration {trainer.iteration} of {c.train.iterations}; "
                      f"{saved}", code, f"continue with `rlhflab train --resume {run_dir}`")
    table = None
    if probes is not None:
        # before save_final: merging LoRA removes the adapter-disabled reference this evaluation compares with
        console.print(f"probe evaluation ({sum(map(len, probes.groups.values()))} prompts × "
                      f"{probes.samples_per_prompt} samples, policy and reference) → {run_dir / 'eval'}")
        result, answers = _evaluate_trainer(trainer, probes)
        if main:
            write_eval(run_dir / "eval", result, answers)
        table = format_table(result)
        warn({}, check_evaluation(result, trainer.iteration))
    if c.train.save_final:
        from rlhflab.export.card import write_card

        final = trainer.save_final()
        if main:
            write_card(run_dir, final)
    if c.eval.report and main:
        from rlhflab.evaluation.report import write_report

        html_path, _ = write_report(run_dir)
        console.print(f"report → {html_path}")
    if table is not None:
        console.print(table, markup=False, highlight=False, soft_wrap=True)
    console.print(f"done in {time.perf_counter() - started:.0f} s → {run_dir}")
    return trainer


def _start_run_dir(run_dir: Path, resume: bool, console, clean: bool = True):
    """Check `--out` / `--resume` against what the folder holds. -> the checkpoint to resume from, or None when
    the run starts at iteration 0 (a new folder, or a run stopped before its first checkpoint). `clean`: remove
    half-written checkpoints (process 0's job)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir} is a file; pick a folder name for the run")
    checkpoint = latest_checkpoint(run_dir)
    removed = remove_partial_checkpoints(run_dir) if clean else 0
    if removed:
        console.print(f"removed {removed} half-written checkpoint(s) a stopped process left in {run_dir / 'checkpoints'}")
    if checkpoint is not None and not resume:
        raise UserError(f"{run_dir} already holds a run (checkpoint {checkpoint.name}); continue it with "
                        f"`rlhflab train --resume {run_dir}`, or pick another --out")
    if checkpoint is None and (resume or (run_dir / "metrics.jsonl").exists()):
        how = "--resume" if resume else "the train command"
        console.print(f"{run_dir} stopped before its first checkpoint: {how} starts it again from iteration 0")
    return checkpoint


def _load_probes(config: Config):
    """The recipe's probe file, checked (behaviour spec included), or None when it names none."""
    if not config.eval.probes:
        return None
    probes = load_probes(config.eval.probes)
    probes.behavior_reward()
    return probes


def _evaluate_trainer(trainer, probes, **kwargs) -> tuple[dict, list[dict]]:
    """Evaluate the trainer's policy against its reference: the frozen copy, or the base with LoRA disabled."""
    c = trainer.config
    if trainer.ref_model is not None:
        reference, context = trainer.ref_model, nullcontext
    else:
        reference, context = trainer.policy, trainer.policy.disable_adapter
    with trainer.precision.autocast(), trainer.processes.gathered(trainer.policy_forward, trainer.ref_forward):
        return evaluate(trainer.policy, reference, trainer.tokenizer, probes, prompt_format=trainer.prompt_format,
                        system_prompt=c.model.system_prompt, reference_context=context, seed=c.train.seed,
                        logprobs_from_forward=trainer.recomputes_old_logprobs, processes=trainer.processes,
                        samplers=trainer.sampling_copy.samplers() if trainer.sampling_copy else None, **kwargs)


def _probe_hook(probes, config: Config):
    """`extra_metrics` for iteration_step: every eval.every iterations, a small probe evaluation of the policy
    (eval.samples_per_prompt_during samples per prompt, no greedy answers) logged as eval/<group>/<metric>."""

    def hook(trainer) -> dict[str, float]:
        if trainer.iteration % config.eval.every:
            return {}
        t0 = time.perf_counter()
        result, _ = _evaluate_trainer(trainer, probes, samples_per_prompt=config.eval.samples_per_prompt_during,
                                      greedy=False, sides=("policy",))
        return {**eval_metrics(result), "time/eval": time.perf_counter() - t0}

    return hook


def group_status(m: dict) -> str:
    """Per-group part of the progress line (prompt groups only), e.g. `  | sky behaviour 0.81 len 18  | retain ...`."""
    names = [k.split("/")[1] for k in m if k.startswith("group/") and k.endswith("/length")]
    return "".join(f"  | {n}" + (f" behaviour {m[f'group/{n}/behaviour']:.2f}" if f"group/{n}/behaviour" in m else "")
                   + f" len {m[f'group/{n}/length']:.0f}" for n in names)


class _NoProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, *a, **k):
        return 0

    def update(self, *a, **k):
        pass
