"""`rlhflab export`: GGUF read back with gguf's reader (names, shapes, types, tokenizer, the rotary permutation), the
PEFT adapter loaded onto its base with peft, the Hugging Face copy and its model card, and bad input."""

import json

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from rlhflab.cli import app
from rlhflab.config import Config
from rlhflab.errors import UserError
from rlhflab.export.card import model_card
from rlhflab.export.gguf import permute_rotary
from rlhflab.export.run import export_run

runner = CliRunner()
SPECIALS = ["<|pad|>", "<|im_start|>", "<|im_end|>"]
CORPUS = ["What color is the sky? The sky is blue.", "Name a color: red, green, blue.", "Describe the sea.",
          "The quick brown fox jumps over the lazy dog 123 times."] * 4


def build_bpe_llama(out, tie: bool = True):
    """A random 2-layer Llama with a byte-level BPE tokenizer that has merges (llama.cpp needs them), ChatML."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from rlhflab.models.loading import CHATML_TEMPLATE

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=SPECIALS[0], bos_token=SPECIALS[1],
                                        eos_token=SPECIALS[2])
    tokenizer.chat_template = CHATML_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=core.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=tie)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def bpe_model(tmp_path_factory):
    return build_bpe_llama(tmp_path_factory.mktemp("bpe") / "model")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, bpe_model):
    """A finished 2-iteration LoRA run on the BPE model, with a probe evaluation: final/ and its card."""
    from rlhflab.pipelines.train import train
    from rlhflab.runs.seeding import seed_everything

    root = tmp_path_factory.mktemp("run")
    (root / "prompts.txt").write_text("What color is the sky?\nName a color.\nDescribe the sea.\nSay something.\n")
    (root / "probes.yaml").write_text(yaml.safe_dump({
        "behavior": "contains:red", "samples_per_prompt": 2, "temperature": 1.0, "max_new_tokens": 4,
        "groups": {"trained": ["What color is the sky?"], "capability": ["What is 7 + 5?"]}}))
    config = Config.model_validate({
        "model": {"name": str(bpe_model), "prompt_format": "chat", "dtype": "float32",
                  "lora": {"enabled": True, "r": 4, "alpha": 8}, "critic": "shared"},
        "data": {"prompts": str(root / "prompts.txt")},
        "rollout": {"prompts_per_iteration": 4, "samples_per_prompt": 2, "max_new_tokens": 6},
        "reward": {"spec": "regex:[aeiou]"},
        "ppo": {"epochs": 1, "minibatch_size": 4},
        "train": {"iterations": 2, "learning_rate": 1e-2, "checkpoint_every": 0},
        "eval": {"probes": str(root / "probes.yaml"), "report": False},
    })
    seed_everything(0)
    train(config, root / "run", quiet=True)
    return root / "run"


def _reader(path):
    import gguf

    return gguf.GGUFReader(path)


def _field(reader, key):
    return reader.fields[key].contents()


# ---------------------------------------------------------------------------------------------- GGUF


def test_rotary_permutation_interleaves_the_halves_of_each_head():
    rows = np.arange(8)[:, None]  # (out, in) = (8, 1): head_dim 8, rows 0-3 and 4-7 are the two halves
    assert permute_rotary(rows, 1)[:, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert permute_rotary(rows, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]  # two heads of 4


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_gguf_export_reads_back_with_every_tensor_and_the_tokenizer(bpe_model, tmp_path, dtype):
    import gguf
    from gguf.quants import dequantize
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = export_run(bpe_model, "gguf", tmp_path / "m.gguf", dtype)
    reader = _reader(out)
    model = AutoModelForCausalLM.from_pretrained(bpe_model)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied: no output tensor
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == len(state) == 2 * 9 + 2
    assert _field(reader, "general.architecture") == "llama" and _field(reader, "llama.block_count") == 2
    assert _field(reader, "llama.attention.head_count_kv") == 2 and _field(reader, "llama.rope.dimension_count") == 16

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    want = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}[dtype]
    for hf_name, weight in state.items():
        t = tensors[names.get_name(hf_name, try_suffixes=(".weight",))]
        assert list(t.shape) == list(weight.shape)[::-1]  # GGUF lists dimensions innermost first
        assert t.tensor_type.name == ("F32" if weight.ndim == 1 else want), hf_name
        data = dequantize(t.data, t.tensor_type).reshape(weight.shape)
        expected = weight.numpy()
        if "q_proj" in hf_name or "k_proj" in hf_name:
            expected = permute_rotary(expected, 4 if "q_proj" in hf_name else 2)
        tolerance = {"f32": 0, "f16": 1e-3, "q8_0": 2e-3}[dtype]  # Q8_0: scale / 2 of |w| ≲ 0.1
        assert np.abs(data - expected).max() <= tolerance, hf_name

    tokenizer = AutoTokenizer.from_pretrained(bpe_model)
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert tokens == [tok for tok, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])]
    types = _field(reader, "tokenizer.ggml.token_type")
    assert types[:3] == [gguf.TokenType.CONTROL] * 3 and set(types[3:]) == {gguf.TokenType.NORMAL}
    merges = json.loads((bpe_model / "tokenizer.json").read_text())["model"]["merges"]
    assert len(_field(reader, "tokenizer.ggml.merges")) == len(merges) > 0
    assert _field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert _field(reader, "tokenizer.ggml.eos_token_id") == 2 and _field(reader, "tokenizer.ggml.bos_token_id") == 1
    assert _field(reader, "tokenizer.ggml.add_bos_token") is False
    assert "<|im_start|>" in _field(reader, "tokenizer.chat_template")


def test_untied_embeddings_export_an_output_tensor(tmp_path):
    model = build_bpe_llama(tmp_path / "untied", tie=False)
    names = {t.name for t in _reader(export_run(model, "gguf", tmp_path / "u.gguf")).tensors}
    assert "output.weight" in names and "token_embd.weight" in names


def test_gguf_of_a_run_is_named_after_it(lora_run, tmp_path):
    reader = _reader(export_run(lora_run, "gguf", tmp_path / "run.gguf", "f16"))
    assert _field(reader, "general.name") == lora_run.name and _field(reader, "general.file_type") == 1


def test_gguf_export_errors_are_one_line(bpe_model, tmp_path):
    from rlhflab.models.loading import TINY

    with pytest.raises(UserError, match="no BPE merges"):  # the byte-level tiny model: llama.cpp could not load it
        export_run(TINY, "gguf", tmp_path / "t.gguf")
    with pytest.raises(UserError, match="does not exist"):
        export_run(bpe_model, "gguf", tmp_path / "missing" / "m.gguf")
    with pytest.raises(UserError, match="must name a .gguf file"):
        export_run(bpe_model, "gguf", tmp_path / "m.bin")
    with pytest.raises(UserError, match="--dtype q4"):
        export_run(bpe_model, "gguf", tmp_path / "m.gguf", "q4")
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UserError, match="'gpt2' model; GGUF export supports Llama"):
        export_run(gpt2, "gguf", tmp_path / "g.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2"]  # nothing half-written


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_unwritable_out_is_a_user_error(bpe_model):
    with pytest.raises(UserError, match="cannot write /proc/m.gguf"):  # /proc takes no new files, not even root's
        export_run(bpe_model, "gguf", "/proc/m.gguf")


# ------------------------------------------------------------------------------------- adapter and hf


def test_adapter_loads_onto_its_base_with_peft_and_matches_final(lora_run, bpe_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = export_run(lora_run, "adapter", tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= {p.name for p in out.iterdir()}
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(bpe_model), out).eval()
    final = AutoModelForCausalLM.from_pretrained(lora_run / "final").eval()
    base = AutoModelForCausalLM.from_pretrained(bpe_model).eval()
    ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
    with torch.no_grad():
        got, want, before = (m(ids).logits for m in (adapted, final, base))
    assert (want - before).abs().max() > 1e-3  # training moved the model, so the match below means something
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    card = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    assert card["library_name"] == "peft" and "peft" in card["tags"]
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4


def test_hf_export_is_final_with_its_card(lora_run, tmp_path):
    out = export_run(lora_run, "hf", tmp_path / "hf")
    final = lora_run / "final"
    assert (out / "model.safetensors").read_bytes() == (final / "model.safetensors").read_bytes()
    assert (out / "README.md").read_text() == (final / "README.md").read_text()


def test_final_holds_a_hub_model_card(lora_run):
    from huggingface_hub import ModelCard

    text = (lora_run / "final" / "README.md").read_text()
    meta = yaml.safe_load(text.split("---")[1])
    assert {"rlhflab", "rlhf", "ppo", "lora"} <= set(meta["tags"]) and meta["library_name"] == "transformers"
    assert ModelCard.load(lora_run / "final" / "README.md").data.tags == meta["tags"]  # the Hub's own parser
    rows = [json.loads(line) for line in (lora_run / "metrics.jsonl").open()]
    assert f"| final KL to the base (nats per answer) | {rows[-1]['objective/kl']:.3g} |" in text
    evaluation = json.loads((lora_run / "eval" / "eval.json").read_text())
    assert "| trained |" in text and "| capability |" in text and evaluation["behavior"] in text
    assert "lora:" in text and "LoRA r=4" in text  # the recipe and how it was trained


def test_card_names_the_hub_base_of_the_embedded_model(lora_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(lora_run, run, ignore=shutil.ignore_patterns("final", "checkpoints"))
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["model"]["name"] = "smollm2-135m-instruct"
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    meta = yaml.safe_load(model_card(run).split("---")[1])
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["license"] == "apache-2.0"
    assert "base_model" not in yaml.safe_load(model_card(lora_run).split("---")[1])  # a local base has no Hub id


def test_export_errors_are_one_line(tmp_path, tiny_config, lora_run):
    from rlhflab.pipelines.train import train

    full = tmp_path / "full"
    train(tiny_config, full, quiet=True)
    with pytest.raises(UserError, match="trained every weight .*--format hf or --format gguf"):
        export_run(full, "adapter", tmp_path / "a")
    with pytest.raises(UserError, match="has no final/ model"):  # save_final is off in tiny_config
        export_run(full, "hf", tmp_path / "h")
    with pytest.raises(UserError, match="exists and is not empty"):
        export_run(lora_run, "hf", lora_run)
    with pytest.raises(UserError, match="--dtype applies to --format gguf only"):
        export_run(lora_run, "hf", tmp_path / "h", "f16")
    result = runner.invoke(app, ["export", str(lora_run), "--format", "onnx", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert "--format onnx is not an export format; use one of gguf, adapter, hf" in result.output


# ------------------------------------------------------------------------------- a real client (slow)


@pytest.mark.slow
def test_llama_cpp_answers_the_f32_export_like_transformers(tmp_path, gguf_roundtrip):
    """The embedded model exported as f32 GGUF, loaded by llama-cpp-python: its greedy answers to the 8 trained
    sky probes equal transformers' token for token (a difference is allowed only at a near-tie, gap < 0.01)."""
    pytest.importorskip("llama_cpp", reason="needs the gguf-client extra (llama-cpp-python)")
    from pathlib import Path

    from rlhflab.models.loading import EMBEDDED

    bench = gguf_roundtrip
    probes = Path(__file__).resolve().parent.parent / "recipes" / "data" / "sky_probes.yaml"
    rows = bench.roundtrip(EMBEDDED, ["f32"], probes, "trained", 40, tmp_path, echo=lambda line: None)["f32"]
    assert len(rows) == 8 and all(r["same_prompt_tokens"] for r in rows)
    assert all(r["agree"] or abs(r.get("gap", 1.0)) < 0.01 for r in rows), [r for r in rows if not r["agree"]]
