import json
import re

import pytest

from common.errors import UserError
from data import load_gsm8k, load_records, make_synthetic
from data.prompt import INSTRUCTION, clean_solution, encode_prompt, encode_sft_example, render_prompt
from rewards import numeric_reward
from tests.conftest import gsm8k_dir, needs_gsm8k

GEN_PROMPT_END = "<|im_start|>assistant\n<think>\n\n</think>\n\n"


@needs_gsm8k
def test_gsm8k_sizes_and_fields():
    train, test = load_gsm8k("train", gsm8k_dir()), load_gsm8k("test", gsm8k_dir())
    assert (len(train), len(test)) == (7473, 1319)
    first = train[0]
    assert first["question"].startswith("Natalia sold clips")
    assert first["solution"].endswith("#### 72") and first["answer"] == "72"
    assert len(load_gsm8k("test", gsm8k_dir(), max_samples=5)) == 5


def test_gsm8k_reads_env_dir(tmp_path, monkeypatch):
    (tmp_path / "test.jsonl").write_text(json.dumps({"question": "q?", "answer": "1 + 1 = 2\n#### 2"}) + "\n\n")
    monkeypatch.setenv("GSM8K_DIR", str(tmp_path))
    assert load_gsm8k("test") == [{"question": "q?", "solution": "1 + 1 = 2\n#### 2", "answer": "2"}]


def test_gsm8k_bad_line_names_file_and_line(tmp_path):
    good = json.dumps({"question": "q", "answer": "#### 1"})
    (tmp_path / "train.jsonl").write_text(good + "\n" + good + "\n{not json\n")
    with pytest.raises(UserError, match=r"train\.jsonl:3: bad GSM8K line"):
        load_gsm8k("train", data_dir=str(tmp_path))
    (tmp_path / "train.jsonl").write_text(json.dumps({"question": "q", "answer": "no final answer"}) + "\n")
    with pytest.raises(UserError, match=r"train\.jsonl:1:"):
        load_gsm8k("train", data_dir=str(tmp_path))


def test_gsm8k_missing_dir_names_data_dir(tmp_path):
    with pytest.raises(UserError, match="--data_dir"):
        load_gsm8k("test", data_dir=str(tmp_path / "nowhere"))


def test_gsm8k_offline_without_dir_names_data_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("GSM8K_DIR", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty hub cache
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(UserError, match="--data_dir"):
        load_gsm8k("test")


def test_synthetic_is_seeded_disjoint_and_correct():
    train, test = make_synthetic("train"), make_synthetic("test")
    assert (len(train), len(test)) == (5000, 500)
    assert make_synthetic("train", max_samples=50) == train[:50]
    assert make_synthetic("train", max_samples=50, seed=1) != train[:50]
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    assert len({r["question"] for r in train}) == len(train)
    assert numeric_reward([r["solution"] for r in train], [r["answer"] for r in train]) == [1.0] * len(train)
    for r in train[:500]:  # every calculator annotation is right
        for expr, value in re.findall(r"<<([^=]+)=([^>]+)>>", r["solution"]):
            assert eval(expr) == float(value), r["solution"]  # noqa: S307 - our own arithmetic
    assert load_records("synthetic", "test", max_samples=3) == test[:3]
    with pytest.raises(UserError, match="cannot load dataset 'no/such-dataset': .*offline, a hub dataset loads only "
                                        "from its cache; pass a .jsonl/.json/.csv/.parquet file or a folder"):
        load_records("no/such-dataset", "train")  # a hub id, offline and not cached: one line


def test_synthetic_kinds_draw_only_the_named_templates():
    """`synthetic:<kinds>` keeps to those templates (the demo's seen and new kinds), splits stay disjoint,
    and a wrong kind is one line naming the seven."""
    from data.synthetic import KINDS

    assert list(KINDS) == ["add", "sub", "mul", "div", "mul_sub", "wage", "times_more"]
    new = load_records("synthetic:times_more", "train", max_samples=200)
    assert len(new) == 200 and all("times as many" in r["question"] for r in new)
    seen = load_records("synthetic:add,sub,mul,div,mul_sub,wage", "train", max_samples=300)
    assert not any("times as many" in r["question"] for r in seen)
    assert any("earns $" in r["question"] for r in seen) and any("equally among" in r["question"] for r in seen)
    test = load_records("synthetic:times_more", "test", max_samples=50)
    assert not {r["question"] for r in new} & {r["question"] for r in test}
    assert numeric_reward([r["solution"] for r in new], [r["answer"] for r in new]) == [1.0] * len(new)
    mixed = load_records("synthetic:add,times_more,times_more", "train", max_samples=600)
    assert 0.6 < sum("times as many" in r["question"] for r in mixed) / 600 < 0.73  # named twice: 2/3
    with pytest.raises(UserError, match="synthetic kinds are add, sub, .* unknown: divide"):
        load_records("synthetic:add,divide", "train")


def test_eval_dataset_takes_the_held_out_problems_from_another_dataset():
    from data import run_records
    from grpo.config import GRPOConfig

    cfg = GRPOConfig(dataset="synthetic:add", eval_dataset="synthetic:times_more", eval_samples=20, max_samples=30)
    train, held_out = run_records(cfg)
    assert all(" more " in r["question"] and "times" not in r["question"] for r in train)
    assert len(held_out) == 20 and all("times as many" in r["question"] for r in held_out)


def test_prompt_renders_qwen3_non_thinking(tiny_tokenizer):
    prompt = render_prompt(tiny_tokenizer, "  How many?  ")
    assert prompt == f"<|im_start|>user\nHow many?\n{INSTRUCTION}<|im_end|>\n{GEN_PROMPT_END}"


def test_clean_solution():
    solution = "She sold 48/2 = <<48/2=24>>24 clips.\n#### 24"
    assert clean_solution(solution) == "She sold 48/2 = 24 clips.\n#### 24"
    assert clean_solution(solution, strip_calculator=False) == solution


def test_sft_example_masks_exactly_the_prompt(tiny_tokenizer):
    question, solution = "Ann has 3 apples. How many?", "Ann has <<1+2=3>>3.\n#### 3"
    prompt_ids = encode_prompt(tiny_tokenizer, question)
    ids, labels = encode_sft_example(tiny_tokenizer, question, solution)
    assert ids[: len(prompt_ids)] == prompt_ids  # SFT trains on what GRPO and eval sample from
    assert labels[: len(prompt_ids)] == [-100] * len(prompt_ids)
    assert labels[len(prompt_ids):] == ids[len(prompt_ids):]
    assert ids[-1] == tiny_tokenizer.eos_token_id and labels[-1] == tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.decode(ids[len(prompt_ids):]) == "Ann has 3.\n#### 3<|im_end|>"
    # prompt + target is the finished assistant turn the chat template renders
    messages = [{"role": "user", "content": f"{question}\n{INSTRUCTION}"},
                {"role": "assistant", "content": "Ann has 3.\n#### 3"}]
    turn = tiny_tokenizer.apply_chat_template(messages, tokenize=False)
    assert turn == tiny_tokenizer.decode(ids) + "\n"
    assert encode_sft_example(tiny_tokenizer, question, solution, max_length=len(ids) - 1) is None  # never cut
    assert encode_sft_example(tiny_tokenizer, question, solution, max_length=len(ids)) == (ids, labels)


def test_prompt_format_system_instruction_and_thinking_on_the_template(tiny_tokenizer):
    """A system prompt comes first, `{question}` places the question in the instruction, and thinking on
    leaves the generation prompt open at `<|im_start|>assistant\\n` (Qwen3's thinking mode)."""
    from data.prompt import PromptFormat, build_messages

    fmt = PromptFormat(system_prompt="You are terse.", instruction="Q: {question} Answer as '#### N'.",
                       chat_template_kwargs={"enable_thinking": True})
    assert fmt.thinking and build_messages(" 2+2? ", fmt=fmt) == [
        {"role": "system", "content": "You are terse."}, {"role": "user", "content": "Q: 2+2? Answer as '#### N'."}]
    assert render_prompt(tiny_tokenizer, "2+2?", fmt=fmt) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nQ: 2+2? Answer as '#### N'.<|im_end|>\n"
        "<|im_start|>assistant\n")
    plain = PromptFormat(instruction="")
    assert render_prompt(tiny_tokenizer, "2+2?", fmt=plain) == f"<|im_start|>user\n2+2?<|im_end|>\n{GEN_PROMPT_END}"


def test_thinking_sft_target_thinks_with_the_solution_and_answers_after(tiny_tokenizer):
    from data.prompt import PromptFormat, answer_text

    fmt = PromptFormat(chat_template_kwargs={"enable_thinking": True})
    ids, labels = encode_sft_example(tiny_tokenizer, "Ann has 3. How many?", "Ann has 3.\n#### 3", fmt=fmt)
    target = tiny_tokenizer.decode([t for t in labels if t != -100], skip_special_tokens=True)
    assert target == "<think>\nAnn has 3.\n</think>\n\n#### 3"  # <think> survives decoding, as on Qwen3
    assert answer_text(target, fmt) == "\n\n#### 3"


@pytest.mark.parametrize("text,thinking,want", [
    ("<think>\nso 3?\n#### 3", True, None),  # cut inside its reasoning: no answer, whatever it tried there
    ("<think>\nso 3?\n#### 3\n</think>\n\n#### 4", True, "4"),
    ("<think>a</think> #### 2 <think>b</think>\n#### 5", True, "5"),  # after the last </think>
    ("#### 7", True, None),  # thinking on and never closed (a template may open <think> in the prompt)
    ("plan...</think>\n#### 7", True, "7"),  # opened in the prompt (Qwen3-Thinking-2507), closed here
    ("<think>\nso 3?\n#### 3", False, "3"),  # thinking off: read as before
])
def test_answers_are_read_after_the_thinking(text, thinking, want):
    from data.prompt import PromptFormat, answer_text
    from rewards import extract_answer
    from rewards.functions import RewardSettings, named

    fmt = PromptFormat(chat_template_kwargs={"enable_thinking": thinking})
    assert extract_answer(answer_text(text, fmt)) == want
    [(_, numeric)] = named(["numeric"], RewardSettings(thinking=thinking))  # the built-in, as GRPO makes it
    assert numeric(completions=[text], answer=[want or "3"]) == [1.0 if want else 0.0]
    if not thinking:
        [(_, thinking_numeric)] = named(["numeric"], RewardSettings(thinking=True))
        assert thinking_numeric(completions=[text], answer=["3"]) == [0.0]


def test_thinking_span_counts_tokens_to_the_last_close(tiny_tokenizer):
    from data.prompt import think_close_id, thinking_fields, thinking_span

    close_id = think_close_id(tiny_tokenizer)
    assert close_id == tiny_tokenizer.convert_tokens_to_ids("</think>")
    ids = tiny_tokenizer("<think>\nab\n</think>\n#### 3", add_special_tokens=False)["input_ids"]
    n, closed = thinking_span(ids, close_id)
    assert closed and ids[n] == close_id and n == ids.index(close_id)
    assert thinking_span(ids[:3], close_id) == (3, False) and thinking_span([5, 6], close_id) == (2, False)
    assert thinking_fields([(n, True), (3, False)]) == {"thinking_tokens_mean": (n + 3) / 2,
                                                         "thinking_closed_rate": 0.5}


def test_bad_prompt_flags_are_one_line():
    from data.prompt import check_instruction, parse_template_kwargs

    with pytest.raises(UserError, match=r"--chat_template_kwargs must be a JSON object .*got 'thinking'"):
        parse_template_kwargs("thinking")
    with pytest.raises(UserError, match=r"--chat_template_kwargs must be a JSON object .*got '\[1\]'"):
        parse_template_kwargs("[1]")
    with pytest.raises(UserError, match=r"--instruction may hold \{question\} and no other placeholder \(got "
                                        r"\{answer\}"):
        check_instruction("Solve {question}, then {answer}")
    check_instruction("Solve {question}.")


def test_several_named_eval_datasets_are_each_evaluated_and_logged(tmp_path, tiny_tokenizer):
    """--eval_dataset twice (NAME=DATASET, or a name made from the dataset): the first is the main
    held-out set (eval_accuracy), each is logged as eval_<name>_*, its predictions kept under its name,
    and the plot draws each curve."""
    import json

    from data import eval_specs
    from grpo.trainer import LOG_NAME, GRPOConfig, train_grpo
    from viz.plots import named_evals

    cfg = GRPOConfig(model_name="tiny", dataset="synthetic:add", grpo_output=str(tmp_path / "run"), max_steps=1,
                     prompts_per_step=2, num_generations=2, max_completion_length=8, eval_every=1, eval_samples=6,
                     eval_max_new_tokens=8, device="cpu", show_progress=False,
                     eval_dataset=("synthetic:times_more", "seen=synthetic:add,sub"))
    assert eval_specs(cfg) == [("times_more", "synthetic:times_more"), ("seen", "synthetic:add,sub")]
    train_grpo(cfg)
    log = [json.loads(x) for x in (tmp_path / "run" / LOG_NAME).read_text().splitlines()]
    for line in log:
        assert line["eval_accuracy"] == line["eval_times_more_accuracy"]
        assert "eval_seen_accuracy" in line and "eval_seen_format_rate" in line
    assert named_evals(log) == ["eval_times_more_accuracy", "eval_seen_accuracy"]
    seen = [json.loads(x)["question"] for x in (tmp_path / "run" / "eval" / "seen" / "eval_predictions.jsonl")
            .read_text().splitlines()]
    assert len(seen) == 6 and (tmp_path / "run" / "eval" / "step_1" / "seen" / "eval_summary.json").is_file()


def test_two_eval_datasets_with_one_name_are_one_line():
    from common.errors import UserError
    from data import eval_specs
    from grpo.config import GRPOConfig

    with pytest.raises(UserError, match="both named 'add'"):
        eval_specs(GRPOConfig(eval_dataset=("synthetic:add", "add=synthetic:sub")))


# A chat template with no thinking mode (ChatML as SmolLM2 and most non-Qwen chat models ship it): it
# never reads enable_thinking, so thinking on renders the very prompt thinking off does.
CHATML_NO_THINKING = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Qwen3's way, with `<think>` registered as a special token (the tiny tokenizer's, like Qwen3's, is an
# added token that is not special): what decides is what the template renders, not how the token is kept.
QWEN_STYLE_SPECIAL_THINK = (
    CHATML_NO_THINKING[:-len("{%- endif %}")]
    + "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
      "{%- endif %}{%- endif %}"
)


def _model_folder_with_template(tmp_path, template, special_think=False):
    """A model folder as far as the thinking check reads it: tiny's tokenizer with `template`."""
    import shutil

    from models import load_tokenizer
    from models.tiny import tiny_dir

    tok = load_tokenizer("tiny")
    if special_think:
        tok.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})
    tok.chat_template = template
    tok.save_pretrained(tmp_path)
    shutil.copy(tiny_dir() / "config.json", tmp_path / "config.json")
    (tmp_path / "model.safetensors").write_bytes(b"")  # never read: the check stops before the model loads
    return str(tmp_path)


@pytest.mark.parametrize("template,special_think,refused", [
    ("tiny", False, False),  # Qwen3's template (tiny's): thinking leaves <think> open
    (QWEN_STYLE_SPECIAL_THINK, True, False),
    (CHATML_NO_THINKING, False, True),
    (CHATML_NO_THINKING, True, True),
])
def test_thinking_is_checked_against_what_the_template_renders(tmp_path, template, special_think, refused):
    from data.prompt import DEFAULT_FORMAT, PromptFormat, check_thinking
    from models import load_tokenizer

    model = "tiny" if template == "tiny" else _model_folder_with_template(tmp_path, template, special_think)
    thinking = PromptFormat(chat_template_kwargs={"enable_thinking": True})
    check_thinking(DEFAULT_FORMAT, model, lambda m: pytest.fail("thinking off loads no tokenizer"))
    if not refused:
        check_thinking(thinking, model, load_tokenizer)
        return
    with pytest.raises(UserError, match=r"^thinking is on \(--enable_thinking\) but .* chat template has no "
                                        r"thinking mode .*drop --enable_thinking") as err:
        check_thinking(thinking, model, load_tokenizer)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("cli", ["train_sft", "train_grpo", "eval"])
def test_every_stage_refuses_thinking_on_a_template_without_it_before_loading_data(tmp_path, cli):
    """The data named does not exist: the thinking line comes first, so nothing was loaded before it."""
    import eval.__main__
    import train_grpo
    import train_sft

    model = _model_folder_with_template(tmp_path / "m", CHATML_NO_THINKING)
    data = ["--dataset", str(tmp_path / "missing.jsonl"), "--enable_thinking"]
    main, argv = {"train_sft": (train_sft.main, ["--model_name", model, "--sft_output", str(tmp_path / "o")]),
                  "train_grpo": (train_grpo.main, ["--model_name", model, "--grpo_output", str(tmp_path / "o")]),
                  "eval": (eval.__main__.main, ["--model", model])}[cli]
    with pytest.raises(UserError, match=r"^thinking is on \(--enable_thinking\)"):
        main([*argv, *data])
