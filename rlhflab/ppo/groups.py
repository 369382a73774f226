"""Prompt groups in the loop (scoped edits, docs/scoped.md): each group's reward, the per-sample KL weight, the
behaviour detector, and per-group metrics.

Shapes: B = samples. `group_ids` (B,) holds the index of each sample's group in `config.prompt_groups`.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from rlhflab.config import INHERIT_REWARD, PromptGroup
from rlhflab.ppo.losses import vocab_kl
from rlhflab.ppo.stats import masked_sum
from rlhflab.rewards.specs import Reward, build_reward


def group_rewards(groups: list[PromptGroup], recipe_spec: Any, override: Any = None) -> list[Reward | None]:
    """Each group's reward: its own spec, the recipe's `reward.spec` (or the caller's `override` callable) when it
    inherits, None when it has none (its answers score 0 and only the KL penalty acts on them)."""
    inherited = override if override is not None else recipe_spec
    shared = None  # groups that inherit share one Reward (one reward model in memory)
    out: list[Reward | None] = []
    for g in groups:
        if g.reward == INHERIT_REWARD:
            shared = shared or build_reward(inherited)
            out.append(shared)
        else:
            out.append(None if g.reward is None else build_reward(g.reward))
    return out


def behaviour_detector(spec: str | None, rewards: list[Reward | None]) -> Reward | None:
    """What `group/<name>/behaviour` counts (an answer shows it when the score is > 0): `data.behaviour`, else the
    first term of the first group's reward (`contains:red` of [contains:red, length]); None when there is neither."""
    if spec:
        return build_reward(spec)
    return Reward(rewards[0].components[:1]) if rewards[0] is not None else None


def score_groups(rewards: list[Reward | None], group_ids: list[int], prompts: list[str], completions: list[str],
                 metadata: list[dict]) -> tuple[list[float], dict[str, list[float | None]]]:
    """Score each sample with its group's reward. -> (total (B,), component name -> (B,) values, None on the rows
    of groups that lack that component); a group without a reward scores 0."""
    total: list[float] = [0.0] * len(group_ids)
    components: dict[str, list[float | None]] = {}
    for g, reward in enumerate(rewards):
        rows = [i for i, gi in enumerate(group_ids) if gi == g]
        if reward is None or not rows:
            continue
        scores, values = reward.score([prompts[i] for i in rows], [completions[i] for i in rows],
                                      [metadata[i] for i in rows])
        for i, score in zip(rows, scores):
            total[i] = score
        for name, column in values.items():
            out = components.setdefault(name, [None] * len(group_ids))
            for i, value in zip(rows, column):
                out[i] = value
    return total, components


def gather_components(components: dict[str, list[float | None]], rows: int, processes) -> dict[str, list]:
    """`score_groups`' components of every process's share (`rows` samples each), concatenated in rank order: a
    share that holds no sample of a group lacks that group's components, which are None on its rows."""
    if processes.world_size == 1:
        return components
    shares = processes.gather_objects([components])  # one dict per process
    names = list(dict.fromkeys(name for share in shares for name in share))
    return {name: [v for share in shares for v in share.get(name, [None] * rows)] for name in names}


def per_sample(per_group: list[float], group_ids: torch.Tensor) -> torch.Tensor:
    """A value per group (G,) spread to its samples: group_ids (B,) -> (B,) float, e.g. each answer's KL scale."""
    return torch.tensor(per_group, dtype=torch.float32, device=group_ids.device)[group_ids]


def group_metrics(names: list[str], group_ids: torch.Tensor, scores: torch.Tensor, kl: torch.Tensor,
                  lengths: torch.Tensor, behaviour: torch.Tensor | None) -> dict[str, float]:
    """group/<name>/{score, kl, length, behaviour}: per group, the mean raw score, KL per answer (nats), answer length
    (tokens) and share of answers showing the behaviour. All inputs (B,); groups without samples are left out."""
    out = {}
    for g, name in enumerate(names):
        rows = group_ids == g
        if not rows.any():
            continue
        out[f"group/{name}/score"] = scores[rows].float().mean().item()
        out[f"group/{name}/kl"] = kl[rows].float().mean().item()
        out[f"group/{name}/length"] = lengths[rows].float().mean().item()
        if behaviour is not None:
            out[f"group/{name}/behaviour"] = (behaviour[rows] > 0).float().mean().item()
    return out


def mode_share(values: list[float], decimals: int = 6) -> float:
    """Share of the values equal (to `decimals`) to the most common one: 1.0 when every sample scored the same,
    so the reward gives no signal to learn from."""
    if not values:
        return float("nan")
    return Counter(round(v, decimals) for v in values).most_common(1)[0][1] / len(values)


# The most memory the rollout's kept reference log-probs over the vocabulary may take (B' × T × V × 4 bytes).
KEEP_REFERENCE_BYTES = 512 * 2**20


class RetainKL:
    """The `retain_kl` loss term: the exact KL(π‖π_ref) over the whole vocabulary on the answers of groups with a
    `retain_kl_coef` (docs/scoped.md). The reference's log-probs over the vocabulary come from the rollout's
    reference forward, kept for those rows while they fit in KEEP_REFERENCE_BYTES (the main job: 85 MB); past that
    (a large vocabulary, long answers) or on several processes, from a forward in the update on those rows only.

    `reference`: the module the reference's forward runs through. With LoRA, the policy with its adapters disabled
    (`context`): under FSDP2 its sharded root, which gathers the weights (a collective every process runs, so every
    row counts as a retain row there); under DDP the module inside the wrapper, whose own forward would broadcast
    buffers, a collective the processes without retain rows would never join."""

    def __init__(self, active: bool, processes, reference, context, precision, temperature: float):
        self.active, self.processes, self.reference, self.context = active, processes, reference, context
        self.precision, self.temperature = precision, temperature

    def rows(self, coef: torch.Tensor) -> torch.Tensor | None:
        """(b,) bool: the micro-batch's rows the term covers (coef (b,) > 0; every row under FSDP2); None when no
        group has a retain KL."""
        if not self.active:
            return None
        return torch.ones_like(coef, dtype=torch.bool) if self.processes.sharded else coef > 0

    def rollout_rows(self, coef: torch.Tensor, response_len: int) -> torch.Tensor | None:
        """(B,) bool: the rows whose reference log-probs over the vocabulary the rollout keeps (coef (B,) > 0);
        None when the update computes them: several processes, or more than KEEP_REFERENCE_BYTES in fp32."""
        rows = coef > 0
        if not self.active or self.processes.world_size > 1 or not rows.any():
            return None
        vocab = self.reference.get_output_embeddings().weight.shape[0]
        return rows if int(rows.sum()) * response_len * vocab * 4 <= KEEP_REFERENCE_BYTES else None

    @torch.no_grad()
    def reference_logprobs(self, input_ids, attention_mask, response_len: int) -> torch.Tensor:
        """The reference's log-probs over the whole vocabulary at each answer position: (b, L) -> (b, T, V)."""
        every = torch.ones(len(input_ids), dtype=torch.bool, device=input_ids.device)
        with self.context(), self.precision.autocast():
            return self.reference(input_ids, attention_mask, response_len, self.temperature, vocab_rows=every)[3]

    def term(self, vocab_logprobs, input_ids, attention_mask, response_len: int, coef, weights,
             reference: torch.Tensor | None = None) -> torch.Tensor:
        """Σ w · c · KL(π‖π_ref) over the rows' answer tokens. vocab_logprobs (b, T, V) the policy's on these rows,
        input_ids / attention_mask (b, L), coef (b,) retain_kl_coef, weights (b, T) from `loss_weights`,
        reference (b, T, V) the reference's log-probs kept from the rollout (None: a forward now); 0 when b is 0
        (no reference forward on no rows)."""
        if not len(input_ids):
            return weights.new_zeros(())
        ref = self.reference_logprobs(input_ids, attention_mask, response_len) if reference is None else reference
        return masked_sum(vocab_kl(vocab_logprobs, ref) * coef[:, None], weights)
