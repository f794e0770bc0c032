"""`evaluate`: sample completions for records, score them, summarize. Used by eval, SFT and GRPO."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common.distributed import current
from common.errors import fail
from common.run_files import write_json
from data import Record
from data.prompt import (
    DEFAULT_FORMAT,
    MAX_PROMPT_LENGTH,
    PromptFormat,
    answer_text,
    prompts_within,
    think_close_id,
    thinking_fields,
    thinking_span,
)
from eval.metrics import summarize
from rewards import answers_match, extract_answer, extract_last_number, harness
from sampling import Sampler, SamplingParams

GREEDY = SamplingParams()  # evaluate's default: one greedy completion per problem


def evaluate(
    sampler: Sampler,
    tokenizer: Any,
    records: list[Record],
    params: SamplingParams = GREEDY,
    *,
    show_progress: bool = True,
    max_prompt_length: int = MAX_PROMPT_LENGTH,
    shots: Sequence[tuple[str, str]] = (),
    prompt_format: PromptFormat = DEFAULT_FORMAT,
    scoring: str = "numeric",
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """(summary, predictions) for `records`: `params.num_samples` completions each from `sampler` (its
    batch size, continuous batching, CUDA graphs), greedy at temperature 0 (the default).
    Two scores per completion: `correct` (strict: the number after the last `####`) and
    `correct_flexible` (the last number in the text, lm-evaluation-harness's flexible-extract), both
    by the same numeric comparison. `shots`: few-shot (question, solution) turns before each problem.
    Problems whose prompt is longer than `max_prompt_length` tokens are skipped and counted in the
    summary's `prompts_skipped` (the scores are over the others). `prompt_format`: the prompt
    (data/prompt.py); with thinking on, answers are read after the thinking only, and the summary has
    `thinking_tokens_mean` and `thinking_closed_rate`. `scoring`: `numeric` (ours) or `harness`
    (lm-evaluation-harness's string rules: `score_answer`).

    Under torchrun each rank answers every world_size-th record; the scored answers are gathered so every
    rank returns the same summary and the predictions in record order (rank 0 writes them).
    """
    from tqdm.auto import tqdm

    dist = current()
    asked = len(records)
    records, all_prompts, skipped = prompts_within(tokenizer, records, max_prompt_length, shots, prompt_format)
    think = think_close_id(tokenizer) if prompt_format.thinking else None
    if not records:
        fail(f"every one of the {asked} problems has a prompt longer than --max_prompt_length {max_prompt_length} "
             f"tokens; raise --max_prompt_length")
    mine = list(range(dist.rank, len(records), dist.world_size))
    prompts = [all_prompts[i] for i in mine]
    start = time.perf_counter()
    show = show_progress and dist.is_main and sys.stderr.isatty()  # a bar, never \r-lines in a log file
    with tqdm(total=len(prompts), desc="eval", unit="q", disable=not show, leave=False) as bar:
        out = sampler.sample(prompts, params, progress=bar)
    wall = time.perf_counter() - start
    scored_here = []  # (record index, scored sample, completion text)
    for j, tokens, truncated in zip(out.prompt_index, out.token_ids, out.truncated):
        i = mine[j]
        completion = tokenizer.decode(tokens, skip_special_tokens=True)
        answer = answer_text(completion, prompt_format)
        scored = {**score_answer(answer, records[i]["answer"], scoring), "truncated": truncated,
                  "num_tokens": len(tokens)}
        if think is not None:
            scored["thinking_tokens"], scored["thinking_closed"] = thinking_span(tokens, think)
        scored_here.append((i, scored, completion))
    gathered = dist.gather_objects((scored_here, wall))
    groups: list[list[dict[str, Any]]] = [[] for _ in records]
    texts: list[list[str]] = [[] for _ in records]
    for part, _ in gathered:
        for i, scored, completion in part:
            groups[i].append(scored)
            texts[i].append(completion)
    predictions = [{"question": r["question"], "gold": r["answer"], "completion": completion, **scored}
                   for r, group, completions in zip(records, groups, texts)
                   for scored, completion in zip(group, completions)]
    wall = max(w for _, w in gathered)
    summary = summarize(groups, [r["answer"] for r in records])
    total_tokens = sum(s["num_tokens"] for g in groups for s in g)
    if scoring != "numeric":
        summary["scoring"] = scoring
    summary.update(tokens_per_s=total_tokens / max(wall, 1e-9), wall_time_s=wall, temperature=params.temperature,
                   max_new_tokens=params.max_new_tokens, prompts_skipped=skipped, prompt_format=prompt_format.to_json())
    if think is not None:
        summary.update(thinking_fields([(s["thinking_tokens"], s["thinking_closed"]) for g in groups for s in g]))
    return summary, predictions


def score_answer(answer: str, gold: str, scoring: str = "numeric") -> dict[str, Any]:
    """The strict and flexible reading of one answer and whether each is right: `numeric`, the number after
    the last `####` and the last number in the text, compared as numbers (rewards/numeric.py); `harness`,
    lm-evaluation-harness's strict-match and flexible-extract compared as strings (rewards/harness.py)."""
    if scoring == "harness":
        extracted, last = harness.strict(answer), harness.flexible(answer)
        return {"extracted": extracted, "correct": harness.exact_match(extracted, gold), "extracted_flexible": last,
                "correct_flexible": harness.exact_match(last, gold)}
    extracted, last = extract_answer(answer), extract_last_number(answer)
    return {"extracted": extracted, "correct": answers_match(extracted, gold), "extracted_flexible": last,
            "correct_flexible": answers_match(last, gold)}


def write_results(out_dir: Any, summary: dict[str, Any], predictions: list[dict[str, Any]]) -> None:
    """`eval_summary.json` and `eval_predictions.jsonl` in `out_dir`, each written atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "eval_summary.json", summary)
    tmp = out / ".eval_predictions.jsonl.tmp"
    tmp.write_text("".join(json.dumps(p) + "\n" for p in predictions))
    os.replace(tmp, out / "eval_predictions.jsonl")


def eval_fields(summary: dict[str, Any], prefix: str = "eval_") -> dict[str, float]:
    """The eval metrics a training log line carries, prefixed `eval_` (a named held-out set: `eval_<name>_`)."""
    keys = ("accuracy", "accuracy_flexible", "format_rate", "truncation_rate", "mean_completion_tokens")
    return {f"{prefix}{k}": summary[k] for k in keys}
