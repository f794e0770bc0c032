import shutil
import subprocess
import sys

import pytest
import torch

from common.errors import UserError
from data.prompt import encode_prompt
from models import load_model, load_tokenizer, require_4bit
from models.tiny import QWEN3_COMMON, QWEN3_SHAPES, build_tiny_tokenizer, random_config, tiny_dir
from tests.conftest import ROOT, give_lora_b_weights


def test_tiny_builds_deterministically(tmp_path, monkeypatch, tiny_tokenizer):
    cached = load_model("tiny", device="cpu")
    monkeypatch.setenv("QGG_CACHE_DIR", str(tmp_path))
    fresh_dir = tiny_dir()
    assert fresh_dir.parent == tmp_path
    fresh = load_model("tiny", device="cpu")
    assert load_tokenizer("tiny").get_vocab() == tiny_tokenizer.get_vocab()
    for (name, a), (_, b) in zip(cached.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), name
    n_params = sum(p.numel() for p in fresh.parameters())
    assert 500_000 < n_params < 5_000_000
    assert type(fresh).__name__ == "Qwen3ForCausalLM"


def test_tiny_tokenizer_settings(tiny_tokenizer):
    t = tiny_tokenizer
    assert (t.eos_token, t.pad_token, t.bos_token, t.padding_side) == ("<|im_end|>", "<|endoftext|>", None, "left")
    assert t.tokenize("Ann has 1080 eggs")[-5:] == ["1", "0", "8", "0", "Ġeggs"]  # digits are single tokens
    assert t.decode(t("Ann has 12 pens.\n#### 12")["input_ids"]) == "Ann has 12 pens.\n#### 12"
    assert build_tiny_tokenizer().get_vocab() == t.get_vocab()


def test_save_and_reload_same_logits(tmp_path, tiny_model, tiny_tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tiny_model.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    ids = torch.tensor([encode_prompt(tokenizer, "How many?")])
    with torch.no_grad():
        assert torch.allclose(tiny_model(ids).logits, reloaded(ids).logits, atol=1e-6)
    assert load_model(str(tmp_path), device="cpu").config.eos_token_id == tiny_tokenizer.eos_token_id


def test_generation_stops_at_eos(tiny_model, tiny_tokenizer):
    """Teach the model to answer at once with <|im_end|>; generate must then stop right there."""
    prompt = encode_prompt(tiny_tokenizer, "Say nothing.")
    ids = torch.tensor([prompt + [tiny_tokenizer.eos_token_id]])
    labels = torch.tensor([[-100] * len(prompt) + [tiny_tokenizer.eos_token_id]])
    opt = torch.optim.Adam(tiny_model.parameters(), lr=1e-2)
    for _ in range(20):
        loss = tiny_model(ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    out = tiny_model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)
    new = out[0, len(prompt):].tolist()
    assert new[0] == tiny_tokenizer.eos_token_id and len(new) < 20


def test_random_qwen3_shape_matches_the_release(tiny_tokenizer):
    config = random_config("Qwen/Qwen3-0.6B", tiny_tokenizer)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (1024, 28, 16)
    assert (config.num_key_value_heads, config.head_dim, config.intermediate_size) == (8, 128, 3072)
    assert (config.vocab_size, config.tie_word_embeddings) == (151936, True)
    assert config.rope_parameters["rope_theta"] == 1e6
    from transformers import Qwen3ForCausalLM

    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == 596_049_920  # Qwen3-0.6B's published count
    assert set(QWEN3_SHAPES) >= {"Qwen/Qwen3-0.6B", "Qwen/Qwen3-4B"} and QWEN3_COMMON["head_dim"] == 128
    # the benchmark shape: 4 layers, 256 wide, its own head_dim over the common one, Qwen3's vocabulary
    small = random_config("qwen3-4x256", build_tiny_tokenizer())
    assert (small.num_hidden_layers, small.hidden_size, small.head_dim, small.vocab_size) == (4, 256, 64, 151936)


def test_random_model_loads_small(monkeypatch):
    monkeypatch.setitem(QWEN3_SHAPES, "test/shape", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                                         num_attention_heads=2, num_key_value_heads=1,
                                                         tie_word_embeddings=True))
    monkeypatch.setitem(QWEN3_COMMON, "vocab_size", 1000)
    model = load_model("random:test/shape", device="cpu")
    assert model.config.vocab_size == 1000 and model.config.num_hidden_layers == 1
    with pytest.raises(UserError, match="not a known shape"):
        load_model("random:nope/nope", device="cpu")


def test_unknown_model_offline_names_the_fix():
    with pytest.raises(UserError, match="`tiny`"):
        load_model("Qwen/Qwen3-DoesNotExist", device="cpu")
    with pytest.raises(UserError, match="does not exist"):
        load_model("./no/such/folder", device="cpu")


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        load_model(str(tmp_path), device="cpu")


def test_4bit_tiny_loads_and_runs(tiny_tokenizer):
    model = load_model("tiny", device="cpu", load_in_4bit=True, tokenizer=tiny_tokenizer)
    assert any("4bit" in type(m).__name__ for m in model.modules())
    ids = torch.tensor([encode_prompt(tiny_tokenizer, "How many?")])
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_qlora_gradients_survive_an_eval_pass(tiny_tokenizer):
    """A rollout or eval (eval mode, no grad) between QLoRA steps must not change the next step's LoRA
    gradients: bitsandbytes would otherwise repack the 4-bit weights on an AVX512-BF16 CPU and switch
    to a kernel with no backward."""
    from models.lora import add_lora

    model = add_lora(load_model("tiny", device="cpu", load_in_4bit=True, tokenizer=tiny_tokenizer), r=4, alpha=8,
                     dropout=0.0)
    torch.manual_seed(0)
    give_lora_b_weights(model, 0.2)
    ids = torch.tensor([encode_prompt(tiny_tokenizer, "How many apples are left?")] * 2)

    def lora_grads():
        model.train()
        model.zero_grad()
        model(ids).logits.float().pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    before = lora_grads()
    model.eval()
    with torch.no_grad():
        model(ids)
    after = lora_grads()
    assert before.keys() == after.keys() and len(before) > 0
    for name, g in before.items():
        assert torch.equal(after[name], g), name


def test_4bit_without_bitsandbytes_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    with pytest.raises(UserError, match="pip install") as info:
        require_4bit("cpu")
    assert "\n" not in str(info.value)


def test_old_transformers_is_refused_in_one_line(monkeypatch):
    import importlib.metadata

    from models.loading import MIN_TRANSFORMERS, require_transformers

    require_transformers()  # the installed one
    require_transformers(MIN_TRANSFORMERS)
    with pytest.raises(UserError, match=r"transformers 5\.17\.0 is too old.*pip install -U") as info:
        require_transformers("5.17.0")
    assert "\n" not in str(info.value)
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "5.23.0" if name == "transformers" else real(name))
    with pytest.raises(UserError, match="5.23.0 is too old"):
        load_model("tiny")
    floor = [line.split(">=")[1].split()[0] for line in (ROOT / "requirements.txt").read_text().splitlines()
             if line.startswith("transformers>=")]
    assert floor == [MIN_TRANSFORMERS], "requirements.txt and MIN_TRANSFORMERS must agree"


def test_cli_errors_are_one_line():
    code = "from common.errors import run_cli; from models import load_model; run_cli(lambda: load_model('x/y'))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(ROOT / ".venv")})
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error: cannot load 'x/y'")


def test_tiny_cache_survives_a_removed_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("QGG_CACHE_DIR", str(tmp_path))
    first = tiny_dir()
    shutil.rmtree(first)
    assert tiny_dir() == first and (first / "config.json").is_file()


def test_bf16_reference_copy_keeps_the_policy_rotary_frequencies(tiny_model, tiny_tokenizer):
    """GRPO's full-fine-tuning reference on CUDA is a bf16 copy of the fp32 policy. Only its parameters
    may be cast: its rotary buffers stay the policy's fp32 values, so at step 0 its log-probs equal a
    bf16-autocast forward of the policy within bf16 rounding at every position up to 700 (a bf16
    inv_freq drifts in phase with position, and the error grows along the sequence)."""
    from grpo.batch import completion_logits, pack
    from models import frozen_copy
    from models.logprobs import token_logprobs

    with torch.no_grad():  # sharper attention than random init, so positions matter to the output
        for layer in tiny_model.model.layers:
            layer.self_attn.q_norm.weight.mul_(2.0)
            layer.self_attn.k_norm.weight.mul_(2.0)
    tiny_model.eval()
    ref = frozen_copy(tiny_model, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in ref.parameters()) and not ref.training
    policy_buffers = dict(tiny_model.named_buffers())
    for name, buf in ref.named_buffers():
        assert buf.dtype == policy_buffers[name].dtype and torch.equal(buf, policy_buffers[name]), name

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(10, 500, (20,), generator=g).tolist()
    completions = [torch.randint(10, 500, (680,), generator=g).tolist() for _ in range(4)]
    batch = pack([prompt] * 4, completions, tiny_tokenizer.pad_token_id, "cpu")

    def logprobs(model):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return token_logprobs(completion_logits(model, batch), batch.completion_ids)

    err = (logprobs(ref) - logprobs(tiny_model)).abs()
    early, late = err[:, :100].mean().item(), err[:, -100:].mean().item()
    # seen: early 0.017, late 0.021; with bf16 rotary buffers the late error is 0.050 (3x the early)
    print("ERRS", early, late)
    assert late < 0.03 and late < 1.5 * early, (early, late)


def test_qlora_keeps_the_frozen_embedding_in_its_dtype_and_checkpoints_non_reentrant(tiny_tokenizer):
    """prepare_model_for_kbit_training casts every frozen non-quantized weight to fp32: they go back to the
    model's dtype (bf16 here, as on CUDA: the tied embedding and head, the norms), so decoding does not
    recast them per token and a forward without autocast still runs; gradient checkpointing runs
    non-reentrant, as on the other paths."""
    from models.lora import add_lora

    base = load_model("tiny", device="cpu", load_in_4bit=True, tokenizer=tiny_tokenizer, dtype=torch.bfloat16)
    model = add_lora(base, r=4, alpha=8, dropout=0.0, gradient_checkpointing=True)
    inner = model.get_base_model()
    assert inner.get_input_embeddings().weight.dtype == torch.bfloat16
    assert inner.get_output_embeddings().weight.dtype == torch.bfloat16
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad and p.dtype.is_floating_point}
    assert frozen == {torch.bfloat16}
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    checkpoint = inner.model._gradient_checkpointing_func
    assert checkpoint.keywords.get("use_reentrant") is False
    ids = torch.tensor([encode_prompt(tiny_tokenizer, "How many apples are left?")])
    model.train()
    model(ids).logits.float().pow(2).mean().backward()  # trains through the checkpointed 4-bit layers
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


def test_building_a_random_model_leaves_the_callers_rng_alone():
    # `tiny` is built on a machine's first run and read from the cache after; were the build to reseed the
    # global RNG, a first run's LoRA init and dropout would differ from every later run's
    from models.tiny import _init_model, tiny_config

    torch.manual_seed(123)
    before = torch.get_rng_state()
    _init_model(tiny_config(load_tokenizer("tiny")), seed=0)
    assert torch.equal(torch.get_rng_state(), before)
