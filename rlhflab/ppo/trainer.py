"""The PPO loop. Each iteration runs six stages; `PPOTrainer.iteration` reads top to bottom:

  1. rollout     sample answers from the policy (KV cache, stop at EOS); old log-probs come with them
  2. score       each answer's prompt group's reward scores it (`groups.py`); missing-EOS penalty, normalisation
  3. shape       reference log-probs → per-token KL; values from the critic; −β·KL per token + score at the end
  4. advantages  GAE with the critic, or a critic-free baseline (mean, RLOO, group-normalised); whitening
  5. update      `ppo.epochs` passes of reshuffled minibatches: clipped surrogate, clipped value loss
  6. record      metrics, samples, adaptive β, probe evaluation, checkpoint

The math lives in `kl.py`, `advantages.py`, `losses.py`, `stats.py`; the value model in `critic.py`; sampling in
`rollout.py`; the forward pass in `models/forward.py`.
"""

from __future__ import annotations

import math
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from rlhflab.config import Config
from rlhflab.data.prompts import GroupSampler, load_prompts, render_prompt, resolve_prompt_format
from rlhflab.distributed.processes import Processes, check_divisible, whole
from rlhflab.errors import NonFiniteAbort, UserError
from rlhflab.distributed.throughput import gpu_peak_flops, matmul_weights, throughput_metrics
from rlhflab.models.forward import Forward, ResponseForward, ValueHead
from rlhflab.models.loading import (add_lookup_grad_in_place, enable_gradient_checkpointing, load_causal_lm,
                                    load_tokenizer, pick_device, with_lora)
from rlhflab.models.precision import resolve_precision
from rlhflab.models.sampling_copy import SamplingCopy
from rlhflab.ppo.advantages import (gae, group_normalized_advantages, normalize_scores, reinforce_advantages,
                                    rloo_advantages, shape_rewards)
from rlhflab.ppo.critic import Critic, SeparateCritic, SharedHeadCritic, critic_from_reward_model
from rlhflab.ppo.groups import RetainKL, behaviour_detector, gather_components, group_rewards, per_sample, score_groups
from rlhflab.ppo.kl import adaptive_kl_coef, kl_estimators
from rlhflab.ppo.losses import loss_denominator, loss_weights, policy_loss, value_loss
from rlhflab.ppo.metrics import rollout_metrics, sample_rows
from rlhflab.ppo.rollout import Rollout, forward_answers, gather_generation, generate
from rlhflab.ppo.stats import finite_rows, masked_sum, masked_whiten
from rlhflab.runs.checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from rlhflab.runs.seeding import sample_uniforms, stream_generator
from rlhflab.runs.tracking import Tracker, truncate_jsonl

RewardFn = Callable[[list[str], list[str], list[dict]], list[float]]
ROLLOUT_STREAM, MINIBATCH_STREAM = 1, 2  # runs.seeding streams: the rollout's sampling, the epochs' shuffles


class PPOTrainer:
    def __init__(self, config: Config, run_dir: str | Path, reward: RewardFn | None = None,
                 processes: Processes | None = None):
        self.config = c = config
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # One process, or this process's place in a data-parallel run (distributed/processes.py): it samples and
        # scores its share of each batch, trains its share of each minibatch, and computes everything else on
        # the gathered batch, so N processes give what one gives.
        self.processes = processes or Processes(device=pick_device(c.model.device))
        check_divisible(c, self.processes.world_size)
        # Sampling and shuffling draw from streams of (seed, stream, iteration, index): the same numbers
        # whichever process draws them. Model initialisation uses the global generators, the caller's to seed
        # (runs.seeding.seed_everything) before building the trainer.
        self.seed = c.train.seed
        self.device = self.processes.device
        self.precision = resolve_precision(c.model.dtype, self.device)
        self.dtype = self.precision.param_dtype

        # rewards first: a broken spec should fail before minutes of model loading
        self.groups = c.prompt_groups
        self.rewards = group_rewards(self.groups, c.reward.spec, reward)  # one per group, None: no task reward
        # only group metrics count it: a single-group run does not score its batch a second time
        self.behaviour = behaviour_detector(c.data.behaviour, self.rewards) if c.data.groups else None
        per_group = [load_prompts(g.prompts) for g in self.groups]
        self.prompts = [p for prompts in per_group for p in prompts]
        self.group_of = [g for g, prompts in enumerate(per_group) for _ in prompts]  # prompt index -> group

        self.tokenizer = load_tokenizer(c.model.name)
        self.prompt_format = resolve_prompt_format(self.tokenizer, c.model.prompt_format, c.model.name)
        self.prompt_texts = [render_prompt(p, self.tokenizer, self.prompt_format, c.model.system_prompt)
                             for p in self.prompts]
        self.sampler = GroupSampler([len(p) for p in per_group], c.group_prompt_counts(), c.data.shuffle, self.seed)

        self.policy, self.ref_model = self._build_policy_and_reference()
        self.critic = self._build_critic()
        self.matmul_weights = {"policy": matmul_weights(self.policy), "critic": self.critic.matmul_weights()}
        self.peak_flops = gpu_peak_flops(self.device)  # (FLOP/s, source) for MFU; None: unknown (CPUs)
        # what the update calls: the policy and a value head on its trunk, wrapped for several processes (DDP,
        # FSDP2); sampling and scoring use self.policy itself. Optimizers come after: FSDP2 replaces parameters.
        example = ResponseForward.example(self.device)
        self.policy_forward = self.processes.wrap(ResponseForward(self.policy, self.critic.policy_head), *example)
        self.critic.wrap(self.processes)
        # a full fine-tune's frozen reference: sharded too under FSDP2 (whole only while the rollout runs)
        self.ref_forward = (self.processes.wrap(ResponseForward(self.ref_model), *example, trained=False)
                            if self.ref_model is not None else None)
        self.retain_kl = RetainKL(any(g.retain_kl_coef > 0 for g in self.groups), self.processes,
                                  self.ref_forward or self.processes.unwrap(self.policy_forward),
                                  self._reference_context, self.precision, c.rollout.temperature)
        # tokens only: what training reads is recomputed by the policy's own forwards (models/sampling_copy.py)
        self.sampling_copy = (SamplingCopy(self.policy) if c.rollout.sampling_copy and self.recomputes_old_logprobs
                              and self.precision.bf16_compute and not self.processes.sharded else None)
        self.policy_params = [p for p in self.policy.parameters() if p.requires_grad]
        # the policy's schedule spans the steps it takes: none during critic warm-up
        policy_iterations = c.train.iterations - c.ppo.critic_warmup_iterations
        self.policy_opt, self.policy_sched = self._optimizer(self.policy_params, c.train.learning_rate,
                                                             policy_iterations)
        if self.critic.parameters():
            self.critic.optimizer, self.critic.scheduler = self._optimizer(
                self.critic.parameters(), c.train.critic_learning_rate or c.train.learning_rate, c.train.iterations)
        self.kl_coef = c.ppo.kl_coef
        self.iteration = 0
        self.nonfinite_streak = 0  # iterations in a row with nothing usable (NaN/inf); checkpointed
        # where the once-per-run NaN/inf notices go (the train pipeline prints them on its console)
        self.warn: Callable[[str], None] = lambda message: warnings.warn(message, RuntimeWarning, stacklevel=3)
        self._warned: set[str] = set()
        # objects outside the trainer (e.g. the health monitor) whose JSON-able state_dict() rides along in
        # every checkpoint; resume() hands each its saved state through load_state_dict()
        self.checkpoint_extras: dict[str, Any] = {}

    # -----------------------------------------------------------------------------------------------
    # set-up

    def _build_policy_and_reference(self):
        c = self.config
        policy = load_causal_lm(c.model.name, self.device, self.dtype)
        if c.train.gradient_checkpointing:
            enable_gradient_checkpointing(policy)
        if c.model.lora.enabled:
            # The reference is the same base with adapters disabled: no second copy of the weights.
            return with_lora(policy, c.model.lora), None
        embeddings = policy.get_input_embeddings()
        tied = isinstance(embeddings, nn.Embedding) and embeddings.weight is policy.get_output_embeddings().weight
        if tied and self.processes.world_size == 1:  # DDP and FSDP2 all-reduce what autograd accumulates, not this
            add_lookup_grad_in_place(embeddings)
        ref = load_causal_lm(c.model.name, self.device, self.dtype).eval().requires_grad_(False)
        return policy, ref

    def _fresh_policy(self) -> nn.Module:
        """A new policy on the CPU, as built before training (LoRA included), for whole weights to load into."""
        c = self.config
        return with_lora(load_causal_lm(c.model.name, torch.device("cpu"), self.dtype), c.model.lora)

    def _build_critic(self) -> Critic:
        c = self.config
        if not c.uses_critic:
            return Critic()  # critic-free estimators build and step no value model
        head = ValueHead(self.policy.config.hidden_size, c.model.value_head).to(self.device)
        if c.model.critic == "shared":
            return SharedHeadCritic(head, c.ppo.vf_coef)
        if c.model.critic_init is not None:
            model = critic_from_reward_model(c.model.critic_init, head, self.policy.config.hidden_size, self.device)
        else:
            model = load_causal_lm(c.model.name, self.device, self.dtype)
        if c.train.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        return SeparateCritic(with_lora(model, c.model.lora), head)

    def optimizer_steps(self, iterations: int) -> int:
        c = self.config
        return iterations * c.ppo.epochs * (c.rollout_batch_size // c.ppo.minibatch_size)

    def _optimizer(self, params, lr: float, iterations: int):
        from transformers import get_scheduler

        t = self.config.train
        # fused: one kernel for all parameters instead of ~10 elementwise passes each (a large share of a CPU step)
        opt = torch.optim.AdamW(params, lr=lr, eps=t.adam_eps, weight_decay=t.weight_decay, fused=True)
        kind = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[t.lr_schedule]
        sched = get_scheduler(kind, opt, num_warmup_steps=t.warmup_steps,
                              num_training_steps=self.optimizer_steps(iterations))
        return opt, sched

    def _reference_context(self):
        return self.policy.disable_adapter() if self.ref_model is None else nullcontext()

    # -----------------------------------------------------------------------------------------------
    # stages 1-4: experience

    def _score_forwards(self, gen, vocab_rows: torch.Tensor | None = None):
        """Reference log-probs (B, T), the critic's values (B, T) or None and the reference's log-probs over the
        vocabulary on `vocab_rows` (B,) bool (B', T, V) or None, in rollout-sized batches with padding trimmed."""
        c = self.config
        step, temperature = c.rollout.generation_batch_size, c.rollout.temperature
        with self._reference_context(), self.precision.autocast():
            ref = forward_answers(gen, self.ref_model or self.policy, temperature, step, vocab_rows=vocab_rows)
        with self.precision.autocast():
            return ref.logprobs, self.critic.rollout_values(gen, temperature, step), ref.vocab_logprobs

    @property
    def recomputes_old_logprobs(self) -> bool:
        """In bf16 the sampling pass (KV cache, one token a step) and the training forward (whole sequences,
        packed) round differently, so the first ratio is not 1; old log-probs from a training-style forward
        make it 1 again (as OpenRLHF and veRL do), for one more policy forward (docs/ppo.md, detail 6)."""
        mode = self.config.ppo.recompute_old_logprobs
        return mode == "always" or (mode == "auto" and self.precision.bf16_compute)

    def _recompute_old_logprobs(self, gen) -> None:
        c = self.config
        shared_head = self.critic.policy_head
        with self.precision.autocast():
            out = forward_answers(gen, self.policy, c.rollout.temperature, c.rollout.generation_batch_size, shared_head)
        gen.logprobs, gen.values = out.logprobs, out.values if shared_head is not None else gen.values

    def collect(self) -> Rollout:
        """Stages 1-4: rollout, score, KL-shaped rewards, advantages. This process samples, scores and runs the
        forwards of its share of the batch; from the gathered batch every process computes the same advantages."""
        c, processes = self.config, self.processes
        idx = [i for i in self.sampler.draw() for _ in range(c.rollout.samples_per_prompt)]
        groups = [self.group_of[i] for i in idx]
        group_ids = torch.tensor(groups, device=self.device)
        retain_kl_coef = per_sample([g.retain_kl_coef for g in self.groups], group_ids)
        prompts = [self.prompts[i].display for i in idx]
        metadata = [dict(self.prompts[i].metadata) for i in idx]
        mine = processes.share(len(idx))  # whole prompts: prompts_per_iteration is a multiple of the processes
        t0 = time.perf_counter()
        with processes.gathered(self.policy_forward, *self.critic.modules(), self.ref_forward):
            # 1. rollout: sample j draws its tokens from its own stream (seed, iteration, j)
            uniforms = sample_uniforms((self.seed, ROLLOUT_STREAM, self.iteration), range(len(idx))[mine],
                                       c.rollout.max_new_tokens)
            with self.precision.autocast():
                copy = self.sampling_copy
                gen = generate(copy.refresh() if copy else self.policy, self.tokenizer,
                               [self.prompt_texts[i] for i in idx[mine]], c.rollout.max_new_tokens,
                               c.rollout.temperature, c.rollout.top_k, c.rollout.top_p,
                               batch_size=c.rollout.generation_batch_size, uniforms=uniforms,
                               value_head=None if copy else self.critic.policy_head)
            t1 = time.perf_counter()
            # 2. score
            total, components = score_groups(self.rewards, groups[mine], prompts[mine], gen.texts, metadata[mine])
            behaviour = self.behaviour(prompts[mine], gen.texts, metadata[mine]) if self.behaviour is not None else None
            t2 = time.perf_counter()
            # 3. reference log-probs, values (old log-probs too, when recomputed)
            if self.recomputes_old_logprobs:
                self._recompute_old_logprobs(gen)
            keep = self.retain_kl.rollout_rows(retain_kl_coef[mine], gen.response_ids.shape[1])
            ref_logprobs, values, ref_vocab = self._score_forwards(gen, keep)
        t3 = time.perf_counter()
        # the whole batch on every process
        gen = gather_generation(gen, processes, self.tokenizer.pad_token_id)
        ref_logprobs, values = processes.gather(ref_logprobs), processes.gather(values)
        raw = processes.gather(torch.tensor(total, dtype=torch.float32, device=self.device))
        components = gather_components(components, len(total), processes)
        if behaviour is not None:
            behaviour = processes.gather(torch.tensor(behaviour, dtype=torch.float32, device=self.device))
        valid = torch.isfinite(raw)  # (B,) a NaN/inf reward is "no reward": the sample sits out the update
        if not valid.all():
            self._warn_nonfinite_reward(raw, components)
        r = c.reward
        scores = normalize_scores(raw, gen.has_eos.to(self.device), valid, r.missing_eos_penalty, r.normalization,
                                  r.clip, group_ids)
        mask = gen.response_mask
        kl = kl_estimators(gen.logprobs, ref_logprobs)
        kl = {k: v * mask for k, v in kl.items()}
        ro = Rollout(gen, prompts, metadata, scores, raw, components, ref_logprobs, values, kl, valid=valid)
        ro.group_ids = group_ids
        ro.kl_scale = per_sample([g.kl_scale for g in self.groups], ro.group_ids)
        ro.retain_kl_coef, ro.ref_vocab, ro.ref_vocab_rows = retain_kl_coef, ref_vocab, keep
        ro.behaviour = behaviour
        ro.timings = {"time/generate": t1 - t0, "time/score": t2 - t1, "time/forwards": t3 - t2}
        ro.local_tokens = int(gen.attention_mask[mine].sum())  # this process's share, for throughput
        # 4. advantages
        self._advantages(ro)
        return ro

    def _warn_nonfinite_reward(self, raw: torch.Tensor, components: dict[str, list[float]]) -> None:
        i = int((~torch.isfinite(raw)).nonzero()[0])
        name = next((n for n, v in components.items() if v[i] is not None and not math.isfinite(v[i])), "total")
        self._warn_once("reward", f"reward {name!r} returned {components.get(name, raw.tolist())[i]} for sample {i} "
                                  f"at iteration {self.iteration}: samples with a NaN/inf reward are left out of the "
                                  "update (counted as reward/nonfinite); warned once per run")

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            self.warn(message)

    def _advantages(self, ro: Rollout) -> None:
        c, mask = self.config, ro.loss_mask
        kl_in_reward = self.kl_coef * ro.kl_scale if c.ppo.kl_in == "reward" else 0.0  # (B,) β per answer
        kl = ro.kl[c.ppo.optimized_kl_estimator]
        if c.ppo.advantage_estimator == "gae":
            ro.rewards = shape_rewards(ro.scores, kl, mask, kl_in_reward)
            ro.advantages, ro.returns = gae(ro.rewards, ro.values, mask, c.ppo.gamma, c.ppo.lam)
        else:
            # Critic-free: one advantage per answer, from its KL-penalised sequence reward, on every token.
            seq_reward = ro.scores - kl_in_reward * kl.sum(1)
            estimator = {"reinforce": reinforce_advantages, "rloo": rloo_advantages,
                         "grpo": group_normalized_advantages}[c.ppo.advantage_estimator]
            ro.advantages = estimator(seq_reward, c.rollout.samples_per_prompt, valid=ro.valid).unsqueeze(1) * mask
        # a NaN/inf from the critic or the KL drops its sample like a NaN reward, before whitening spreads it
        finite = finite_rows(ro.advantages, mask)
        if ro.returns is not None:
            finite &= finite_rows(ro.returns, mask)
        if not finite.all():
            ro.valid = finite if ro.valid is None else ro.valid & finite
            mask = ro.loss_mask
            for name in ("advantages", "returns", "values"):  # 0 · NaN is NaN: a zero loss weight is not enough
                if getattr(ro, name) is not None:
                    setattr(ro, name, torch.where(mask > 0, getattr(ro, name), 0.0))
        if c.ppo.whitens_advantages:
            ro.advantages = masked_whiten(ro.advantages, mask)
        if c.ppo.advantage_clip is not None:
            ro.advantages = ro.advantages.clamp(-c.ppo.advantage_clip, c.ppo.advantage_clip) * mask

    # -----------------------------------------------------------------------------------------------
    # stage 5: PPO epochs

    def loss_terms(self, ro: Rollout, rows: torch.Tensor, denominator: torch.Tensor
                   ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """One micro-batch's loss terms, each its share of the minibatch's normalised sum (`loss_weights` with
        the minibatch's `denominator`): the clipped surrogate `policy`, the `kl` to the reference with
        `ppo.optimized_kl_estimator` (kl_in: loss), the `retain_kl` of groups with a retain_kl_coef, the
        `entropy`, the critic's `value` loss. -> (terms, stats)."""
        c, gen = self.config, ro.gen
        i, a, t = gen.trimmed(rows)
        mask = ro.loss_mask[rows, :t]  # (b, T') 0 on samples left out for a NaN/inf reward
        w = loss_weights(mask, c.ppo.loss_normalization, denominator)  # (b, T')
        anchored = self.retain_kl.rows(ro.retain_kl_coef[rows])  # (b,) bool; None: no group has a retain KL
        with self.precision.autocast():
            out = Forward(*self.policy_forward(i, a, t, c.rollout.temperature, with_entropy=c.ppo.entropy_coef > 0,
                                               vocab_rows=anchored))
        terms, stats = {}, {}
        terms["policy"], pg = policy_loss(out.logprobs, gen.logprobs[rows, :t], ro.advantages[rows, :t], mask,
                                          c.ppo.clip_range, c.ppo.dual_clip, w)
        stats.update({f"policy/{k}": v for k, v in pg.items()})
        if c.ppo.kl_in == "loss":
            kl = kl_estimators(out.logprobs, ro.ref_logprobs[rows, :t])[c.ppo.optimized_kl_estimator]  # (b, T')
            terms["kl"] = masked_sum(kl * ro.kl_scale[rows, None], w)  # β · kl_scale per answer (total_loss: β)
        if anchored is not None:  # on every micro-batch, 0 without retain rows: every process logs the same terms
            terms["retain_kl"] = self.retain_kl.term(out.vocab_logprobs, i[anchored], a[anchored], t,
                                                     ro.retain_kl_coef[rows[anchored]], w[anchored],
                                                     ro.kept_reference(rows[anchored], t))
        if out.entropy is not None:
            terms["entropy"] = masked_sum(out.entropy, w)
        with self.precision.autocast():
            values = self.critic.update_values(out, i, a, t, c.rollout.temperature)
        if values is not None:
            terms["value"], stats["value/clipfrac"] = value_loss(
                values, ro.values[rows, :t], ro.returns[rows, :t], mask, c.ppo.clip_range_value, c.ppo.value_loss, w)
        return terms, stats

    def total_loss(self, terms: dict[str, torch.Tensor], train_policy: bool) -> torch.Tensor:
        """What the update minimises; during critic warm-up only the value loss."""
        c = self.config
        loss = self.critic.loss_coef * terms["value"] if "value" in terms else 0.0
        if not train_policy:  # zero weight, yet every policy weight stays in the graph, as DDP requires
            loss = loss + 0.0 * terms["policy"]
        else:
            loss = loss + terms["policy"]
            if "kl" in terms:
                loss = loss + self.kl_coef * terms["kl"]
            if "retain_kl" in terms:
                loss = loss + terms["retain_kl"]  # each row's retain_kl_coef already in
            if "entropy" in terms:
                loss = loss - c.ppo.entropy_coef * terms["entropy"]
        return loss

    def update(self, ro: Rollout) -> dict[str, float]:
        """Stage 5: `ppo.epochs` passes over the batch in reshuffled minibatches; each minibatch accumulates its
        micro-batches' gradients, then takes one optimizer step. A minibatch with a NaN/inf loss or gradient
        norm, or with no valid sample, takes none (`policy/skipped_nonfinite`)."""
        c = self.config
        N, mb = c.rollout_batch_size, c.ppo.minibatch_size
        train_policy = self.iteration > c.ppo.critic_warmup_iterations
        target, check_before_step = c.ppo.target_approx_kl, c.ppo.approx_kl_check == "before_step"
        stats: dict[str, list[float]] = {}
        epochs = steps = nonfinite = 0
        stopped = False
        for module in (self.policy_forward, *self.critic.modules()):
            module.train()  # gradient checkpointing acts in training mode only (dropout is off everywhere)
        while epochs < c.ppo.epochs and not stopped:
            epochs += 1
            perm = torch.randperm(N, generator=stream_generator(self.seed, MINIBATCH_STREAM, self.iteration, epochs))
            epoch_kl = []
            for start in range(0, N, mb):
                rows = perm[start : start + mb]
                mb_stats = self._accumulate(ro, rows, train_policy)
                if mb_stats is None:  # nothing finite to learn from: drop the gradients, advance the schedules
                    self._step(skip=True, train_policy=train_policy)
                    nonfinite += 1
                    continue
                for k, v in mb_stats.items():
                    stats.setdefault(k, []).append(v)
                epoch_kl.append(mb_stats["policy/approxkl"])
                if check_before_step and target is not None and mb_stats["policy/approxkl"] > target:
                    self._zero_grad()
                    stopped = True  # this minibatch moved too far already: no step, no further minibatches
                    break
                skipped = mb_stats["policy/ratio_mean"] > c.ppo.ratio_threshold  # the old TRL guardrail
                grad_norm = self._step(skip=skipped, train_policy=train_policy)
                if not math.isfinite(grad_norm):
                    nonfinite += 1
                    self._warn_once("step", f"iteration {self.iteration}: gradient norm {grad_norm}; the optimizer "
                                            "step was skipped (counted as policy/skipped_nonfinite); warned once")
                else:
                    stats.setdefault("policy/grad_norm", []).append(grad_norm)
                    steps += not skipped
                stats.setdefault("policy/skipped_minibatches", []).append(float(skipped))
            if not check_before_step and target is not None and epoch_kl and np.mean(epoch_kl) > target:
                stopped = True  # early stop of the remaining epochs
        out = {k: (max(v) if k == "policy/ratio_max" else float(np.mean(v))) for k, v in stats.items()}
        # before any step of this iteration the policy is the one that sampled: 1 up to rounding (docs/ppo.md)
        out["policy/ratio_first_minibatch"] = stats["policy/ratio_mean"][0] if stats else float("nan")
        out["policy/epochs"] = float(epochs)
        out["policy/optimizer_steps"] = float(steps if train_policy else 0)
        out["policy/skipped_minibatches"] = float(np.sum(stats.get("policy/skipped_minibatches", [0.0])))
        out["policy/skipped_nonfinite"] = float(nonfinite)
        self.update_usable = steps > 0 or nonfinite == 0  # "nothing usable": every step lost to NaN/inf
        return out

    def _accumulate(self, ro: Rollout, rows: torch.Tensor, train_policy: bool) -> dict[str, float] | None:
        """Backward of this process's share of one minibatch, micro-batch by micro-batch; the gradients, summed
        over every process (DDP / FSDP2, in the last backward), are left for the step. -> the minibatch's stats
        over every process (terms are shares of the minibatch's value: they add up, the max excepted), or None
        when the minibatch holds no valid sample or a loss was NaN/inf on any process (the gradients are then
        garbage; every process still ran every backward, as data-parallel training requires)."""
        c, processes = self.config, self.processes
        mask = ro.loss_mask[rows]
        if not mask.any():
            return None
        denominator = loss_denominator(mask, c.ppo.loss_normalization)  # of the whole minibatch
        mine = rows[processes.share(len(rows))]
        starts = range(0, len(mine), c.micro_batch_size)
        sums: dict[str, torch.Tensor] = {}
        ratio_max = torch.zeros((), device=self.device)
        nonfinite = torch.zeros((), device=self.device)
        for m in starts:
            last = m == starts[-1]  # gradients all-reduce in the minibatch's last backward only
            with nullcontext() if last else processes.no_sync(self.policy_forward, *self.critic.modules()):
                terms, micro_stats = self.loss_terms(ro, mine[m : m + c.micro_batch_size], denominator)
                loss = self.total_loss(terms, train_policy)
                # DDP and FSDP2 average gradients over the processes; each loss is its process's share of the sum
                (loss * processes.world_size).backward()
            nonfinite += (~torch.isfinite(loss.detach())).float()
            for k, v in {**{f"loss/{k}": v for k, v in terms.items()}, **micro_stats}.items():
                if k == "policy/ratio_max":
                    ratio_max = torch.maximum(ratio_max, v.detach())
                else:
                    sums[k] = sums.get(k, 0.0) + v.detach()
        names = list(sums)
        summed = processes.sum(torch.stack([nonfinite, *(sums[k] for k in names)]).float()).tolist()
        if summed[0]:
            self._warn_once("step", f"iteration {self.iteration}: loss is {summed[1 + names.index('loss/policy')]} "
                                    "(policy loss); the optimizer step was skipped (counted as "
                                    "policy/skipped_nonfinite); warned once")
            return None
        mb_stats = dict(zip(names, summed[1:]))
        mb_stats["policy/ratio_max"] = processes.max(ratio_max).item()
        return mb_stats

    def _step(self, skip: bool, train_policy: bool) -> float:
        """Clip and step the critic, and the policy unless the critic is warming up (then its weights and LR
        schedule stand still); `skip` advances the schedules without stepping, and so does a NaN/inf gradient
        norm (AdamW's moments and step count stay as they were). -> the policy's gradient norm (NaN/inf: skipped).
        A head on the policy trunk is clipped with the trunk, as one model; a separate critic on its own."""
        critic_params = self.critic.parameters()
        on_trunk = self.critic.policy_head is not None
        grad_norm, finite = 0.0, True
        if not skip:
            if train_policy:
                grad_norm = self._clip(self.policy_params + (critic_params if on_trunk else []))
            if critic_params and not (train_policy and on_trunk):
                critic_norm = self._clip(critic_params)
                if not math.isfinite(critic_norm):
                    grad_norm = critic_norm  # reported as the skip's cause
            finite = math.isfinite(grad_norm)
            if train_policy and finite:
                self.policy_opt.step()
        with warnings.catch_warnings():  # a skipped first step advances a schedule before any optimizer.step()
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step")
            if train_policy:
                self.policy_sched.step()
            self.critic.step(active=not skip and finite)
        self._zero_grad()
        return grad_norm

    def _clip(self, params: list[nn.Parameter]) -> float:
        """Gradient norm before clipping to `ppo.max_grad_norm` (None: no clipping)."""
        max_norm = self.config.ppo.max_grad_norm
        if max_norm is not None:
            return float(whole(torch.nn.utils.clip_grad_norm_(params, max_norm)))
        return float(whole(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])))

    def _zero_grad(self) -> None:
        # the policy's too during warm-up: a shared head's value loss leaves gradients in the trunk
        self.policy_opt.zero_grad(set_to_none=True)
        if self.critic.optimizer is not None:
            self.critic.optimizer.zero_grad(set_to_none=True)

    # -----------------------------------------------------------------------------------------------
    # stage 6: record

    def iteration_step(self, tracker: Tracker, extra_metrics: Callable[["PPOTrainer"], dict] | None = None,
                       on_row: Callable[[dict], None] | None = None) -> dict[str, float]:
        """One iteration. `extra_metrics(trainer)` may add keys (e.g. probe evaluation) before the row is logged;
        `on_row(row)` sees the logged row (with its iteration) before this iteration's checkpoint is written."""
        c = self.config
        self.iteration += 1
        t0 = time.perf_counter()
        ro = self.collect()  # stages 1-4
        t1 = time.perf_counter()
        metrics = {**rollout_metrics(ro, c, self.kl_coef, self.policy_sched.get_last_lr()[0]), **ro.timings}
        metrics.update(self.update(ro))  # stage 5
        usable = bool(ro.valid.any()) and self.update_usable
        self.nonfinite_streak = 0 if usable else self.nonfinite_streak + 1
        t2 = time.perf_counter()
        # 6. record
        if c.ppo.adaptive_kl_target is not None and math.isfinite(metrics["objective/kl"]):
            self.kl_coef = adaptive_kl_coef(self.kl_coef, metrics["objective/kl"], c.ppo.adaptive_kl_target,
                                              c.ppo.adaptive_kl_horizon, c.rollout_batch_size)
        metrics.update({"time/rollout": t1 - t0, "time/update": t2 - t1, "time/iteration": t2 - t0,
                        **self._throughput(ro, int(metrics["policy/epochs"]), t2 - t0)})
        if extra_metrics is not None:
            metrics.update(extra_metrics(self))
        tracker.log(metrics, self.iteration)
        if on_row is not None:
            on_row({"iteration": self.iteration, **metrics})
        if c.log.sample_every and self.iteration % c.log.sample_every == 0:
            tracker.log_samples(sample_rows(ro, self.iteration, c.log.samples_per_log))
        saved = None
        if self.iteration % max(c.train.checkpoint_every, 1) == 0 and c.train.checkpoint_every:
            saved = self.save()
        if self.nonfinite_streak >= c.train.nonfinite_patience:
            raise NonFiniteAbort(self._nonfinite_cause(ro) + f"; checkpoint at {saved or self.save()}; fix it and "
                                 f"continue with `rlhflab train --resume {self.run_dir}`")
        return metrics

    def _throughput(self, ro: Rollout, epochs: int, seconds: float) -> dict[str, float]:
        tokens = int(ro.gen.attention_mask.sum())  # every process's
        forwards = (self.ref_model is not None or self.config.model.lora.enabled) + self.recomputes_old_logprobs
        return throughput_metrics(self.matmul_weights, tokens, ro.local_tokens, int(ro.gen.response_mask.sum()),
                                  forwards, epochs, self.config.model.lora.enabled, seconds, self.processes,
                                  self.peak_flops)

    def _nonfinite_cause(self, ro: Rollout) -> str:
        """What left the last of `train.nonfinite_patience` iterations in a row with nothing to learn from."""
        n, last = self.config.train.nonfinite_patience, f"(last: iteration {self.iteration})"
        if not torch.isfinite(ro.raw_scores).any():
            return f"the reward returned NaN/inf for every sample in {n} consecutive iterations {last}"
        if not ro.valid.any():
            return (f"the advantages came out NaN/inf for every sample in {n} consecutive iterations {last}: "
                    "check the critic's values and the KL (lower train.learning_rate)")
        return (f"every optimizer step had a NaN/inf loss or gradient norm in {n} consecutive iterations {last}: "
                "lower train.learning_rate or check the reward scale")

    # -----------------------------------------------------------------------------------------------
    # checkpoints

    def save(self) -> Path:
        """A checkpoint of this iteration, written by process 0; every process calls it (gathering sharded
        tensors is a collective). It holds whole tensors, so any number of processes can resume it."""
        processes = self.processes
        tensors = {"policy": processes.full_state(self.policy, trainable_only=True), **self.critic.tensors(processes)}
        state = {
            "iteration": self.iteration,
            "kl_coef": self.kl_coef,
            "nonfinite_streak": self.nonfinite_streak,
            "policy_opt": processes.optimizer_state(self.policy_opt),
            "policy_sched": self.policy_sched.state_dict(),
            **self.critic.optimizer_state(processes),
            "sampler": self.sampler.state_dict(),
            "rng": rng_state(),
            "rng_per_process": processes.gather_objects([rng_state()]),  # [process 0's, process 1's, ...]
            "extra": {name: obj.state_dict() for name, obj in self.checkpoint_extras.items()},
        }
        path = self.run_dir / "checkpoints"
        if processes.is_main:
            path = save_checkpoint(self.run_dir, self.iteration, tensors, state, self.config.train.keep_checkpoints)
        processes.barrier()  # no process runs ahead of a checkpoint it might be killed before
        return path

    def resume(self) -> None:
        """Continue from the latest checkpoint: weights, optimizers, schedulers, β, sampler, RNG streams and
        `checkpoint_extras` (each one the checkpoint holds). Every process reads it; a different number of
        processes than the one that saved it is fine (the sampling streams belong to samples, not processes)."""
        processes = self.processes
        path = latest_checkpoint(self.run_dir)
        if path is None:
            raise UserError(f"{self.run_dir} has no checkpoint to resume from (checkpoints/latest is missing)")
        tensors, state = load_checkpoint(path)
        processes.load_full_state(self.policy, tensors["policy"])
        self.critic.load_tensors(tensors, processes)
        processes.load_optimizer_state(self.policy_opt, state["policy_opt"])
        self.policy_sched.load_state_dict(state["policy_sched"])
        self.critic.load_optimizer_state(state, processes)
        self.sampler.load_state_dict(state["sampler"])
        per_process = state.get("rng_per_process", [])
        set_rng_state(per_process[processes.rank] if len(per_process) == processes.world_size else state["rng"])
        for name, obj in self.checkpoint_extras.items():
            if name in state["extra"]:  # one saved by a script without it (PPOTrainer alone) stays as built
                obj.load_state_dict(state["extra"][name])
        self.iteration, self.kl_coef = state["iteration"], state["kl_coef"]
        self.nonfinite_streak = state.get("nonfinite_streak", 0)  # checkpoints from before the counter: 0
        if processes.is_main:
            for name in ("metrics.jsonl", "samples.jsonl"):
                truncate_jsonl(self.run_dir / name, self.iteration)

    def save_final(self) -> Path:
        """RUN_DIR/final: a plain HF model directory (LoRA merged) that loads without rlhflab, written by
        process 0; every process calls it."""
        c, processes = self.config, self.processes
        out = self.run_dir / "final"
        model = processes.whole_model(self.policy, self._fresh_policy)  # None on processes but 0 when sharded
        if model is not None and c.model.lora.enabled:
            model = model.merge_and_unload()
            if not processes.sharded:
                self.policy = model
        if processes.is_main:
            model.save_pretrained(out)
            self.tokenizer.save_pretrained(out)
        processes.barrier()
        return out
