"""Model specs, tokenizer set-up, padding invariance, and one forward of the embedded model."""

import ctypes

import pytest
import torch

from rlhflab.data.prompts import Prompt, render_prompt
from rlhflab.errors import UserError
from rlhflab.models.forward import ValueHead, forward_response
from rlhflab.models.loading import EMBEDDED, keep_freed_memory, load_causal_lm, load_tokenizer, resolve_model_dir

CPU = torch.device("cpu")


def test_tiny_tokenizer_pad_differs_from_eos_and_pads_left():
    tok = load_tokenizer("tiny")
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "left"


def test_left_padding_does_not_change_logprobs():
    """Position ids skip the padding, so a padded prompt scores its answer exactly like an unpadded one."""
    tok = load_tokenizer("tiny")
    model = load_causal_lm("tiny", CPU, torch.float32).eval()
    short = tok("hi", add_special_tokens=False).input_ids
    answer = tok(" there", add_special_tokens=False).input_ids
    ids = torch.tensor([short + answer])
    padded = torch.tensor([[tok.pad_token_id] * 5 + short + answer])
    mask = torch.ones_like(ids)
    padded_mask = torch.tensor([[0] * 5 + [1] * (len(short) + len(answer))])
    with torch.no_grad():
        a = forward_response(model, ids, mask, len(answer), 1.0).logprobs
        b = forward_response(model, padded, padded_mask, len(answer), 1.0).logprobs
    assert torch.allclose(a, b, atol=1e-5)


def test_value_head_starts_at_zero():
    head = ValueHead(8, "mlp")
    assert torch.equal(head(torch.randn(2, 3, 8)), torch.zeros(2, 3))


def test_bad_model_specs_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        resolve_model_dir(str(tmp_path))
    with pytest.raises(UserError, match="not found"):
        resolve_model_dir(str(tmp_path / "missing.gguf"))


def test_dropout_is_off():
    model = load_causal_lm("tiny", CPU, torch.float32)
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))


def test_embedded_model_forward():
    """The embedded SmolLM2 loads (converted once from its GGUF, then cached) and predicts sensibly."""
    tok = load_tokenizer(EMBEDDED)
    assert tok.pad_token_id != tok.eos_token_id
    model = load_causal_lm(EMBEDDED, CPU, torch.float32).eval()
    text = render_prompt(Prompt(text="What is the capital of France?"), tok, "chat")
    answer = "The capital of France is Paris."
    ids = tok(text + answer, return_tensors="pt", add_special_tokens=False).input_ids
    n = len(tok(answer, add_special_tokens=False).input_ids)
    with torch.no_grad():
        lp = forward_response(model, ids, torch.ones_like(ids), n, 1.0).logprobs
    assert lp.shape == (1, n)
    assert lp.mean().item() > -2.5  # a coherent answer is likely under the model (random would be ≈ −10.8)


@pytest.mark.parametrize("pack_tokens", [256, 8])  # one packed row; one row per segment
def test_packed_forward_matches_plain_forward_and_gradients(monkeypatch, pack_tokens):
    """Packing rows (shared prompt prefix once, no padding) gives the same log-probs, values and gradients."""
    from rlhflab.models import forward as models
    from rlhflab.models.forward import shared_prefix_len

    monkeypatch.setattr(models, "PACK_TOKENS", pack_tokens)
    monkeypatch.setattr(models, "PACK_WHEN_TOKENS_AT_MOST", 1.0)  # pack even where it saves little
    tok = load_tokenizer("tiny")
    model = load_causal_lm("tiny", CPU, torch.float32)
    head = ValueHead(model.config.hidden_size)
    torch.nn.init.normal_(head.net[-1].weight)
    system = "<|im_start|>system\nbe brief<|im_end|>\n"
    prompts = [system + "hi", system + "hello you", system + "hey"]
    answers = [" there<|im_end|>", " x", " a b c d<|im_end|>"]
    q = tok(prompts, padding=True, return_tensors="pt", add_special_tokens=False)
    tok.padding_side = "right"
    r = tok(answers, padding=True, return_tensors="pt", add_special_tokens=False)
    ids = torch.cat([q.input_ids, r.input_ids], 1)
    mask = torch.cat([q.attention_mask, r.attention_mask], 1)
    T = r.input_ids.shape[1]
    assert shared_prefix_len(ids, mask, T) == len(tok(system + "h").input_ids)

    def run(pack):
        model.zero_grad()
        head.zero_grad()
        out = forward_response(model, ids, mask, T, 0.8, head, pack=pack)
        real = r.attention_mask.float()
        ((out.logprobs * real).sum() + (out.values * real).sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        return out.logprobs * real, out.values * real, grads

    lp_a, v_a, g_a = run(False)
    trunk = models.trunk_and_head(model)[0]
    assert models._packed_response_states(trunk, ids, mask, T) is not None  # the packed path runs
    lp_b, v_b, g_b = run(True)
    assert torch.allclose(lp_a, lp_b, atol=1e-5)
    assert torch.allclose(v_a, v_b, atol=1e-5)
    assert all(torch.allclose(g_a[n], g_b[n], atol=1e-4) for n in g_a)


def test_building_a_cached_model_leaves_the_random_stream_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHFLAB_CACHE", str(tmp_path))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    resolve_model_dir("tiny")  # builds the tiny model into the empty cache (seeds its own init)
    assert torch.equal(torch.rand(3), expected)


def test_in_place_lookup_gradient_equals_autograd_for_tied_embeddings():
    """Full fine-tuning with tied embeddings: the in-place lookup gradient gives autograd's exact gradients,
    accumulated over two backward passes as gradient accumulation does — also where an answer holds the padding
    token as a real token (a random model samples it), whose row nn.Embedding keeps gradient-free."""
    from rlhflab.models.loading import add_lookup_grad_in_place

    tok = load_tokenizer("tiny")
    ids = tok(["hello there you", "a b c d e f"], padding=True, return_tensors="pt", add_special_tokens=False)
    ids.input_ids[1, -2] = tok.pad_token_id  # sampled, so attended to (attention_mask 1)
    plain = load_causal_lm("tiny", CPU, torch.float32)
    hooked = load_causal_lm("tiny", CPU, torch.float32)
    assert plain.get_input_embeddings().weight is plain.get_output_embeddings().weight
    add_lookup_grad_in_place(hooked.get_input_embeddings())
    for model in (plain, hooked):
        for _ in range(2):
            out = forward_response(model, ids.input_ids, ids.attention_mask, 3, 1.0)
            out.logprobs.sum().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), hooked.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5), name
    with torch.no_grad():  # no hook work without gradients
        assert not forward_response(hooked, ids.input_ids, ids.attention_mask, 3, 1.0).logprobs.requires_grad


def test_packing_is_skipped_when_it_saves_little():
    """Rows of equal length with no common prefix: packing would only widen attention."""
    from rlhflab.models import forward as models

    tok = load_tokenizer("tiny")
    model = load_causal_lm("tiny", CPU, torch.float32)
    enc = tok(["alpha beta", "gamma delta"], return_tensors="pt", add_special_tokens=False, padding=True)
    assert enc.attention_mask.sum() >= 0.8 * enc.attention_mask.numel()
    trunk = models.trunk_and_head(model)[0]
    assert models._packed_response_states(trunk, enc.input_ids, enc.attention_mask, 1) is None


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def test_freed_large_buffers_stay_in_the_heap():
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("needs glibc >= 2.33 (mallinfo2)")
    libc.mallinfo2.restype = _MallInfo2
    keep_freed_memory()
    size = 64 * 2**20  # above glibc's largest mmap threshold (32 MB): mmapped, then unmapped, by default
    mapped_before = libc.mallinfo2().hblkhd
    x = torch.ones(size // 4)
    assert libc.mallinfo2().hblkhd - mapped_before < size  # served from the heap, not a fresh mmap
    del x
    assert libc.mallinfo2().fordblks >= size  # freed, and kept for the next step rather than returned


def test_lora_on_the_top_layers_only_trains_those_and_stops_the_backward_there():
    from rlhflab.models.loading import add_lora

    model = add_lora(load_causal_lm("tiny", torch.device("cpu"), torch.float32), 4, 8, "all-linear", layers=[-1])
    trained = {n.split(".layers.")[1].split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {str(model.config.num_hidden_layers - 1)}
    seen = []  # the lowest layer's output asks for no gradient: autograd never runs its backward
    model.get_base_model().model.layers[0].register_forward_hook(lambda m, args, out: seen.append(
        (out[0] if isinstance(out, tuple) else out).requires_grad))
    model(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    assert seen == [False]
    with pytest.raises(UserError, match=r"model\.lora\.layers: \[2, -3\] out of range for the model's 2 decoder"):
        add_lora(load_causal_lm("tiny", torch.device("cpu"), torch.float32), 4, 8, "all-linear", layers=[0, 2, -3])
    with pytest.raises(UserError, match=r"needs model\.lora\.target_modules as a list"):
        add_lora(load_causal_lm("tiny", torch.device("cpu"), torch.float32), 4, 8, ".*proj", layers=[0])
