"""The PPO loop. Each iteration runs six stages; `PPOTrainer.iteration` reads top to bottom:

  1. rollout     sample answers from the policy (KV cache, stop at EOS); old log-probs come with them
  2. score       the reward callable scores each answer; missing-EOS penalty, optional normalisation
  3. shape       reference log-probs → per-token KL; values from the critic; −β·KL per token + score at the end
  4. advantages  GAE with the critic, or a critic-free baseline (mean, RLOO, group-normalised); whitening
  5. update      `ppo.epochs` passes of reshuffled minibatches: clipped surrogate, clipped value loss
  6. record      metrics, samples, adaptive β, probe evaluation, checkpoint

The math lives in `ppo_math.py`; models and the forward pass in `models.py`; sampling in `rollout.py`.
"""

from __future__ import annotations

import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from rlhflab.config import Config
from rlhflab.data.prompts import PromptSampler, load_prompts, render_prompt, resolve_prompt_format
from rlhflab.errors import UserError
from rlhflab.models.forward import ValueHead, forward_response
from rlhflab.models.loading import (
    add_lookup_grad_in_place,
    add_lora,
    load_causal_lm,
    load_tokenizer,
    pick_device,
)
from rlhflab.models.precision import resolve_precision
from rlhflab.ppo.advantages import (
    apply_missing_eos_penalty,
    gae,
    group_normalized_advantages,
    reinforce_advantages,
    rloo_advantages,
    shape_rewards,
)
from rlhflab.ppo.kl import adaptive_kl_coef, kl_estimators
from rlhflab.ppo.losses import policy_loss, value_loss
from rlhflab.ppo.rollout import Rollout, forward_answers, generate
from rlhflab.ppo.stats import explained_variance, masked_mean, masked_var, masked_whiten
from rlhflab.runs.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, trainable_state
from rlhflab.runs.tracking import Tracker, truncate_jsonl

RewardFn = Callable[[list[str], list[str], list[dict]], list[float]]


class PPOTrainer:
    def __init__(self, config: Config, run_dir: str | Path, reward: RewardFn | None = None, rank: int = 0):
        self.config = c = config
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self.seed = c.train.seed + rank  # per-rank streams, so processes do not sample the same answers
        self._seed_everything(self.seed)
        self.device = pick_device(c.model.device)
        self.precision = resolve_precision(c.model.dtype, self.device)
        self.dtype = self.precision.param_dtype

        # reward first: a broken spec should fail before minutes of model loading
        from rlhflab.rewards.specs import build_reward

        self.reward = build_reward(reward if reward is not None else c.reward.spec)
        self.prompts = load_prompts(c.data.prompts)

        self.tokenizer = load_tokenizer(c.model.name)
        self.prompt_format = resolve_prompt_format(self.tokenizer, c.model.prompt_format, c.model.name)
        self.prompt_texts = [render_prompt(p, self.tokenizer, self.prompt_format, c.model.system_prompt)
                             for p in self.prompts]
        self.sampler = PromptSampler(len(self.prompts), c.data.shuffle, self.seed)

        self.policy, self.ref_model = self._build_policy_and_reference()
        self.value_head, self.critic = self._build_critic()
        self.policy_opt, self.policy_sched = self._optimizer(self._policy_params(), c.train.learning_rate)
        self.critic_opt = self.critic_sched = None
        if self.critic is not None:
            critic_params = [p for p in self.critic.parameters() if p.requires_grad] + list(self.value_head.parameters())
            self.critic_opt, self.critic_sched = self._optimizer(
                critic_params, c.train.critic_learning_rate or c.train.learning_rate)
        self.kl_coef = c.ppo.kl_coef
        self.iteration = 0

    # -----------------------------------------------------------------------------------------------
    # set-up

    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def _build_policy_and_reference(self):
        c = self.config
        policy = load_causal_lm(c.model.name, self.device, self.dtype)
        if c.model.lora.enabled:
            # The reference is the same base with adapters disabled: no second copy of the weights.
            policy = add_lora(policy, c.model.lora.r, c.model.lora.alpha, c.model.lora.target_modules)
            return policy, None
        embeddings = policy.get_input_embeddings()
        if isinstance(embeddings, nn.Embedding) and embeddings.weight is policy.get_output_embeddings().weight:
            add_lookup_grad_in_place(embeddings)
        ref = load_causal_lm(c.model.name, self.device, self.dtype).eval().requires_grad_(False)
        return policy, ref

    def _build_critic(self) -> tuple[ValueHead | None, nn.Module | None]:
        c = self.config
        if not c.uses_critic:
            return None, None  # critic-free estimators build and step no value model
        hidden = self.policy.config.hidden_size
        head = ValueHead(hidden, c.model.value_head).to(self.device)
        if c.model.critic == "shared":
            return head, None
        if c.model.critic_init is not None:
            critic = self._critic_from_reward_model(c.model.critic_init, head)
        else:
            critic = load_causal_lm(c.model.name, self.device, self.dtype)
        if c.model.lora.enabled:
            critic = add_lora(critic, c.model.lora.r, c.model.lora.alpha, c.model.lora.target_modules)
        return head, critic

    def _critic_from_reward_model(self, rm_dir: str, head: ValueHead) -> nn.Module:
        """The critic as the reward model: its trunk, and its normalised head as the value head, so V(s_t)
        starts as the RM's score of the text up to t (an implementation detail of OpenRLHF and the N+
        details); the values then learn the KL-shaped return from there."""
        from rlhflab.rewards.reward_model import load_reward_model

        rm = load_reward_model(rm_dir, device=str(self.device))
        critic = rm.model.backbone
        if not hasattr(critic, "get_decoder") or critic.config.hidden_size != self.policy.config.hidden_size:
            raise UserError(f"model.critic_init={rm_dir}: the reward model must be a causal-LM reward model with "
                            f"hidden size {self.policy.config.hidden_size} (the policy's); train it with "
                            "`rlhflab rm train --base` set to the policy's model")
        with torch.no_grad():
            head.net[0].weight.copy_(rm.model.head.linear.weight)
            head.net[0].bias.copy_(rm.model.head.linear.bias)
        return critic.train().requires_grad_(True)

    def _policy_params(self) -> list[nn.Parameter]:
        params = [p for p in self.policy.parameters() if p.requires_grad]
        if self.value_head is not None and self.critic is None:
            params += list(self.value_head.parameters())
        return params

    @property
    def optimizer_steps_total(self) -> int:
        c = self.config
        return c.train.iterations * c.ppo.epochs * (c.rollout_batch_size // c.ppo.minibatch_size)

    def _optimizer(self, params, lr: float):
        from transformers import get_scheduler

        t = self.config.train
        # fused: one kernel for all parameters instead of ~10 elementwise passes each (a large share of a CPU step)
        opt = torch.optim.AdamW(params, lr=lr, eps=t.adam_eps, weight_decay=t.weight_decay, fused=True)
        kind = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[t.lr_schedule]
        sched = get_scheduler(kind, opt, num_warmup_steps=t.warmup_steps, num_training_steps=self.optimizer_steps_total)
        return opt, sched

    def _reference_context(self):
        return self.policy.disable_adapter() if self.ref_model is None else nullcontext()

    # -----------------------------------------------------------------------------------------------
    # stages 1-4: experience

    def _score_forwards(self, gen) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Reference log-probs, and separate-critic values, in rollout-sized batches with padding trimmed."""
        c = self.config
        step, temperature = c.rollout.generation_batch_size, c.rollout.temperature
        with self._reference_context(), self.precision.autocast():
            ref_logprobs, _ = forward_answers(gen, self.ref_model or self.policy, temperature, step)
        values = gen.values  # a head on the policy trunk read them during sampling
        if self.critic is not None:
            with self.precision.autocast():
                _, values = forward_answers(gen, self.critic, temperature, step, self.value_head, with_logits=False)
        return ref_logprobs, values

    @property
    def recomputes_old_logprobs(self) -> bool:
        """In bf16 the sampling pass (KV cache, one token a step) and the training forward (whole sequences,
        packed) round differently, so the first ratio is not 1; old log-probs from a training-style forward
        make it 1 again (as OpenRLHF and veRL do), for one more policy forward (docs/ppo.md, detail 6)."""
        mode = self.config.ppo.recompute_old_logprobs
        return mode == "always" or (mode == "auto" and self.precision.bf16_compute)

    def _recompute_old_logprobs(self, gen) -> None:
        c = self.config
        shared_head = self.value_head if self.critic is None else None
        with self.precision.autocast():
            gen.logprobs, values = forward_answers(gen, self.policy, c.rollout.temperature,
                                                   c.rollout.generation_batch_size, shared_head)
        if shared_head is not None:
            gen.values = values

    def _normalize_scores(self, scores: torch.Tensor, has_eos: torch.Tensor) -> torch.Tensor:
        r = self.config.reward
        scores = apply_missing_eos_penalty(scores, has_eos, r.missing_eos_penalty)
        ones = torch.ones_like(scores)
        if r.normalization != "none" and len(scores) > 1:
            scores = masked_whiten(scores, ones, shift_mean=r.normalization == "whiten")
        if r.clip is not None:
            scores = scores.clamp(-r.clip, r.clip)
        return scores

    def collect(self) -> Rollout:
        """Stages 1-4: rollout, score, KL-shaped rewards, advantages."""
        c = self.config
        idx = [i for i in self.sampler.draw(c.rollout.prompts_per_iteration) for _ in range(c.rollout.samples_per_prompt)]
        t0 = time.perf_counter()
        # 1. rollout
        shared_head = self.value_head if self.critic is None else None
        with self.precision.autocast():
            gen = generate(self.policy, self.tokenizer, [self.prompt_texts[i] for i in idx], c.rollout.max_new_tokens,
                           c.rollout.temperature, c.rollout.top_k, c.rollout.top_p,
                           batch_size=c.rollout.generation_batch_size, value_head=shared_head)
        t1 = time.perf_counter()
        # 2. score
        prompts = [self.prompts[i].display for i in idx]
        metadata = [dict(self.prompts[i].metadata) for i in idx]
        total, components = self.reward.score(prompts, gen.texts, metadata)
        raw = torch.tensor(total, dtype=torch.float32, device=self.device)
        scores = self._normalize_scores(raw, gen.has_eos.to(self.device))
        t2 = time.perf_counter()
        # 3. reference log-probs, values, per-token KL (old log-probs too, when recomputed)
        if self.recomputes_old_logprobs:
            self._recompute_old_logprobs(gen)
        ref_logprobs, values = self._score_forwards(gen)
        mask = gen.response_mask
        kl = kl_estimators(gen.logprobs, ref_logprobs)
        kl = {k: v * mask for k, v in kl.items()}
        ro = Rollout(gen, prompts, metadata, scores, raw, components, ref_logprobs, values, kl)
        ro.timings = {"time/generate": t1 - t0, "time/score": t2 - t1, "time/forwards": time.perf_counter() - t2}
        # 4. advantages
        self._advantages(ro)
        return ro

    def _advantages(self, ro: Rollout) -> None:
        c, mask = self.config, ro.gen.response_mask
        kl_in_reward = self.kl_coef if c.ppo.kl_in == "reward" else 0.0
        kl = ro.kl[c.ppo.kl_estimator]
        if c.ppo.advantage_estimator == "gae":
            ro.rewards = shape_rewards(ro.scores, kl, mask, kl_in_reward)
            ro.advantages, ro.returns = gae(ro.rewards, ro.values, mask, c.ppo.gamma, c.ppo.lam)
        else:
            # Critic-free: one advantage per answer, from its KL-penalised sequence reward, on every token.
            seq_reward = ro.scores - kl_in_reward * kl.sum(1)
            estimator = {"reinforce": reinforce_advantages, "rloo": rloo_advantages,
                         "grpo": group_normalized_advantages}[c.ppo.advantage_estimator]
            ro.advantages = estimator(seq_reward, c.rollout.samples_per_prompt).unsqueeze(1) * mask
        if c.ppo.whiten_advantages:
            ro.advantages = masked_whiten(ro.advantages, mask)
        if c.ppo.advantage_clip is not None:
            ro.advantages = ro.advantages.clamp(-c.ppo.advantage_clip, c.ppo.advantage_clip) * mask

    # -----------------------------------------------------------------------------------------------
    # stage 5: PPO epochs

    def update(self, ro: Rollout) -> dict[str, float]:
        c = self.config
        gen = ro.gen
        N, mb, micro = c.rollout_batch_size, c.ppo.minibatch_size, c.micro_batch_size
        train_policy = self.iteration > c.ppo.critic_warmup_iterations
        want_entropy = c.ppo.entropy_coef > 0
        stats: dict[str, list[float]] = {}
        self.policy.train()
        for epoch in range(c.ppo.epochs):
            perm = torch.randperm(N)
            epoch_kl = []
            for start in range(0, N, mb):
                mb_idx = perm[start : start + mb]
                mb_stats: dict[str, list[float]] = {}
                for m in range(0, mb, micro):
                    s = mb_idx[m : m + micro]
                    i, a, t = gen.trimmed(s)
                    mask = gen.response_mask[s, :t]
                    adv, old_lp = ro.advantages[s, :t], gen.logprobs[s, :t]
                    shared_head = self.value_head if self.critic is None else None
                    with self.precision.autocast():
                        out = forward_response(self.policy, i, a, t, c.rollout.temperature, shared_head,
                                               with_entropy=want_entropy)
                    pg_loss, pg = policy_loss(out.logprobs, old_lp, adv, mask, c.ppo.clip_range, c.ppo.dual_clip)
                    loss = pg_loss if train_policy else pg_loss * 0.0
                    if c.ppo.kl_in == "loss":
                        k3 = kl_estimators(out.logprobs, ro.ref_logprobs[s, :t])["k3"]
                        loss = loss + self.kl_coef * masked_mean(k3, mask)
                    if want_entropy:
                        loss = loss - c.ppo.entropy_coef * masked_mean(out.entropy, mask)
                    if self.value_head is not None:
                        with self.precision.autocast():
                            values = out.values if shared_head is not None else forward_response(
                                self.critic, i, a, t, c.rollout.temperature, self.value_head, with_logits=False).values
                        v_loss, v_clipfrac = value_loss(values, ro.values[s, :t], ro.returns[s, :t], mask,
                                                          c.ppo.clip_range_value, c.ppo.value_loss)
                        loss = loss + (c.ppo.vf_coef if shared_head is not None else 1.0) * v_loss
                        mb_stats.setdefault("loss/value", []).append(v_loss.item())
                        mb_stats.setdefault("value/clipfrac", []).append(v_clipfrac.item())
                    if not torch.isfinite(loss):
                        raise RuntimeError(
                            f"iteration {self.iteration}: loss is {loss.item()} (policy loss {pg_loss.item()}); "
                            "lower train.learning_rate or check the reward scale (see docs/ppo.md, debugging)")
                    (loss * len(s) / mb).backward()
                    mb_stats.setdefault("loss/policy", []).append(pg_loss.item())
                    for k, v in pg.items():
                        mb_stats.setdefault(f"policy/{k}", []).append(v.item())
                ratio_mean = float(np.mean(mb_stats["policy/ratio_mean"]))
                skipped = ratio_mean > c.ppo.ratio_threshold  # the old TRL guardrail against a blown-up batch
                grad_norm = self._step(skip=skipped, train_policy=train_policy)
                mb_stats["policy/grad_norm"] = [grad_norm]
                mb_stats["policy/skipped_minibatches"] = [float(skipped)]
                for k, v in mb_stats.items():
                    stats.setdefault(k, []).append(float(np.mean(v)) if k != "policy/ratio_max" else max(v))
                epoch_kl.append(float(np.mean(mb_stats["policy/approxkl"])))
            stats.setdefault("policy/epochs", []).append(1.0)
            if c.ppo.target_approx_kl is not None and np.mean(epoch_kl) > c.ppo.target_approx_kl:
                break  # early stop of the remaining epochs (the old TRL guardrail)
        out = {k: (max(v) if k == "policy/ratio_max" else float(np.mean(v))) for k, v in stats.items()}
        # before any step of this iteration the policy is the one that sampled: 1 up to rounding (docs/ppo.md)
        out["policy/ratio_first_minibatch"] = stats["policy/ratio_mean"][0]
        out["policy/epochs"] = float(len(stats["policy/epochs"]))
        out["policy/skipped_minibatches"] = float(np.sum(stats["policy/skipped_minibatches"]))
        return out

    def _step(self, skip: bool, train_policy: bool) -> float:
        c = self.config
        pairs = [(self.policy_opt, self.policy_sched, self._policy_params(), train_policy)]
        if self.critic_opt is not None:
            critic_params = [p for g in self.critic_opt.param_groups for p in g["params"]]
            pairs.append((self.critic_opt, self.critic_sched, critic_params, True))
        grad_norm = 0.0
        for i, (opt, sched, params, active) in enumerate(pairs):
            if not skip and active:
                if c.ppo.max_grad_norm is not None:
                    norm = torch.nn.utils.clip_grad_norm_(params, c.ppo.max_grad_norm)
                else:
                    norm = torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
                if i == 0:
                    grad_norm = float(norm)
                opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        return grad_norm

    # -----------------------------------------------------------------------------------------------
    # stage 6: record

    def rollout_metrics(self, ro: Rollout) -> dict[str, float]:
        from rlhflab.data.diversity import distinct_n

        c, mask = self.config, ro.gen.response_mask
        per_answer = {k: v.sum(1) for k, v in ro.kl.items()}  # (B,) nats per answer
        kl_used = per_answer[c.ppo.kl_estimator]
        m = {
            "objective/scores": ro.raw_scores.mean().item(),
            "objective/scores_std": ro.raw_scores.std().item() if len(ro.raw_scores) > 1 else 0.0,
            "objective/kl": kl_used.mean().item(),
            "objective/kl_k1": per_answer["k1"].mean().item(),
            "objective/kl_k2": per_answer["k2"].mean().item(),
            "objective/kl_k3": per_answer["k3"].mean().item(),
            "objective/kl_coef": self.kl_coef,
            "objective/rlhf_reward": (ro.raw_scores - self.kl_coef * kl_used).mean().item(),
            "objective/entropy": masked_mean(ro.gen.entropy, mask).item() if ro.gen.entropy is not None else float("nan"),
            "policy/advantage_var": masked_var(ro.advantages, mask).item(),
            "policy/lr": self.policy_sched.get_last_lr()[0],
            "rollout/response_length": mask.sum(1).mean().item(),
            "rollout/eos_rate": ro.gen.has_eos.float().mean().item(),
            "diversity/distinct_1": distinct_n(ro.gen.texts, 1),
            "diversity/distinct_2": distinct_n(ro.gen.texts, 2),
        }
        if ro.values is not None:
            m["value/explained_variance"] = explained_variance(ro.values, ro.returns, mask).item()
            m["value/mean"] = masked_mean(ro.values, mask).item()
        for name, values in ro.components.items():
            m[f"reward/{name}"] = float(np.mean(values))
        return m

    def _sample_rows(self, ro: Rollout) -> list[dict]:
        n = min(self.config.log.samples_per_log, len(ro.prompts))
        return [{"iteration": self.iteration, "prompt": ro.prompts[i], "completion": ro.gen.texts[i],
                 "score": ro.raw_scores[i].item(), "components": {k: v[i] for k, v in ro.components.items()}}
                for i in range(n)]

    def iteration_step(self, tracker: Tracker, extra_metrics: Callable[["PPOTrainer"], dict] | None = None
                       ) -> dict[str, float]:
        """One iteration. `extra_metrics(trainer)` may add keys (e.g. probe evaluation) before the row is logged."""
        c = self.config
        self.iteration += 1
        t0 = time.perf_counter()
        ro = self.collect()  # stages 1-4
        t1 = time.perf_counter()
        metrics = {**self.rollout_metrics(ro), **ro.timings}
        metrics.update(self.update(ro))  # stage 5
        t2 = time.perf_counter()
        # 6. record
        if c.ppo.adaptive_kl_target is not None:
            self.kl_coef = adaptive_kl_coef(self.kl_coef, metrics["objective/kl"], c.ppo.adaptive_kl_target,
                                              c.ppo.adaptive_kl_horizon, c.rollout_batch_size)
        tokens = int(ro.gen.attention_mask.sum())
        metrics.update({"time/rollout": t1 - t0, "time/update": t2 - t1, "time/iteration": t2 - t0,
                        "throughput/tokens_per_s": tokens / (t2 - t0)})
        if extra_metrics is not None:
            metrics.update(extra_metrics(self))
        tracker.log(metrics, self.iteration)
        if c.log.sample_every and self.iteration % c.log.sample_every == 0:
            tracker.log_samples(self._sample_rows(ro))
        if self.iteration % max(c.train.checkpoint_every, 1) == 0 and c.train.checkpoint_every:
            self.save()
        return metrics

    # -----------------------------------------------------------------------------------------------
    # checkpoints

    def save(self) -> Path:
        tensors = {"policy": trainable_state(self.policy)}
        if self.value_head is not None:
            tensors["value_head"] = {k: v.detach().cpu() for k, v in self.value_head.state_dict().items()}
        if self.critic is not None:
            tensors["critic"] = trainable_state(self.critic)
        state = {
            "iteration": self.iteration,
            "kl_coef": self.kl_coef,
            "policy_opt": self.policy_opt.state_dict(),
            "policy_sched": self.policy_sched.state_dict(),
            "critic_opt": self.critic_opt.state_dict() if self.critic_opt else None,
            "critic_sched": self.critic_sched.state_dict() if self.critic_sched else None,
            "sampler": self.sampler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        }
        return save_checkpoint(self.run_dir, self.iteration, tensors, state, self.config.train.keep_checkpoints)

    def resume(self) -> None:
        path = latest_checkpoint(self.run_dir)
        if path is None:
            raise UserError(f"{self.run_dir} has no checkpoint to resume from (checkpoints/latest is missing)")
        tensors, state = load_checkpoint(path)
        self.policy.load_state_dict(tensors["policy"], strict=False)
        if self.value_head is not None:
            self.value_head.load_state_dict(tensors["value_head"])
        if self.critic is not None:
            self.critic.load_state_dict(tensors["critic"], strict=False)
        self.policy_opt.load_state_dict(state["policy_opt"])
        self.policy_sched.load_state_dict(state["policy_sched"])
        if self.critic_opt is not None:
            self.critic_opt.load_state_dict(state["critic_opt"])
            self.critic_sched.load_state_dict(state["critic_sched"])
        self.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        if state["rng"].get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.iteration, self.kl_coef = state["iteration"], state["kl_coef"]
        for name in ("metrics.jsonl", "samples.jsonl"):
            truncate_jsonl(self.run_dir / name, self.iteration)

    def save_final(self) -> Path:
        """RUN_DIR/final: a plain HF model directory (LoRA merged) that loads without rlhflab."""
        out = self.run_dir / "final"
        model = self.policy
        if self.config.model.lora.enabled:
            model = model.merge_and_unload()
            self.policy = model
        model.save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        return out
