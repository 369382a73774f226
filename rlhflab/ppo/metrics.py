"""Stage 6's numbers: what an iteration's rollout and update did, as metrics.jsonl rows (docs/ppo.md, Metrics)
and samples.jsonl rows."""

from __future__ import annotations

import numpy as np
import torch

from rlhflab.config import Config
from rlhflab.data.diversity import distinct_n
from rlhflab.ppo.groups import group_metrics, mode_share
from rlhflab.ppo.rollout import Rollout
from rlhflab.ppo.stats import explained_variance, masked_mean, masked_var


def rollout_metrics(ro: Rollout, config: Config, kl_coef: float, lr: float) -> dict[str, float]:
    """objective/, policy/advantage_var and lr, rollout/, diversity/, value/, reward/ and group/ metrics of one
    iteration's experience; means over the B' samples the update learns from (NaN when there are none)."""
    c, mask, valid, nan = config, ro.loss_mask, ro.valid, float("nan")
    per_answer = {k: v.sum(1)[valid] for k, v in ro.kl.items()}  # (B',) nats per answer
    kl_used = per_answer[c.ppo.optimized_kl_estimator]
    raw = ro.raw_scores[valid]  # (B',)
    some = bool(valid.any())
    m = {
        "objective/scores": raw.mean().item() if some else nan,
        "objective/scores_std": raw.std().item() if len(raw) > 1 else 0.0,
        "objective/scores_mode_share": mode_share(raw.tolist()),
        "objective/kl": kl_used.mean().item() if some else nan,
        "objective/kl_k1": per_answer["k1"].mean().item() if some else nan,
        "objective/kl_k2": per_answer["k2"].mean().item() if some else nan,
        "objective/kl_k3": per_answer["k3"].mean().item() if some else nan,
        "objective/kl_coef": kl_coef,
        "objective/rlhf_reward": (raw - kl_coef * ro.kl_scale[valid] * kl_used).mean().item() if some else nan,
        "objective/entropy": (masked_mean(ro.gen.entropy, mask).item()
                              if some and ro.gen.entropy is not None else nan),
        "policy/advantage_var": masked_var(ro.advantages, mask).item() if some else nan,
        "policy/lr": lr,
        "rollout/response_length": ro.gen.response_mask.sum(1).float().mean().item(),  # every answer sampled
        "rollout/eos_rate": ro.gen.has_eos.float().mean().item(),
        "diversity/distinct_1": distinct_n(ro.gen.texts, 1),
        "diversity/distinct_2": distinct_n(ro.gen.texts, 2),
    }
    if ro.values is not None:
        m["value/explained_variance"] = explained_variance(ro.values, ro.returns, mask).item() if some else nan
        m["value/mean"] = masked_mean(ro.values, mask).item() if some else nan
    keep = valid.tolist()
    for name, values in ro.components.items():  # None: a group whose reward has no such component
        kept = [v for v, k in zip(values, keep) if k and v is not None]
        m[f"reward/{name}"] = float(np.mean(kept)) if kept else nan
    reward_finite = torch.isfinite(ro.raw_scores)
    m["reward/nonfinite"] = float((~reward_finite).sum())  # samples left out for a NaN/inf reward
    m["policy/nonfinite_advantages"] = float((reward_finite & ~valid).sum())  # ... for a NaN/inf advantage
    if c.data.groups:  # over the answers the update learns from, as above
        m.update(group_metrics([g.name for g in c.prompt_groups], ro.group_ids[valid], raw, kl_used,
                               mask.sum(1)[valid], ro.behaviour[valid] if ro.behaviour is not None else None))
    return m


def sample_rows(ro: Rollout, iteration: int, n: int) -> list[dict]:
    """samples.jsonl rows of the first n answers: prompt, completion, score and its components."""
    return [{"iteration": iteration, "prompt": ro.prompts[i], "completion": ro.gen.texts[i],
             "score": ro.raw_scores[i].item(),
             "components": {k: v[i] for k, v in ro.components.items() if v[i] is not None}}
            for i in range(min(n, len(ro.prompts)))]
