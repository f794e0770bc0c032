"""Exact numeric answer matching for GSM8K-style completions."""

from rewards.numeric import (
    REL_TOLERANCE,
    after_thinking,
    answers_match,
    completion_text,
    extract_answer,
    extract_last_number,
    numeric_reward,
    parse_number,
)

__all__ = [
    "REL_TOLERANCE",
    "after_thinking",
    "answers_match",
    "completion_text",
    "extract_answer",
    "extract_last_number",
    "numeric_reward",
    "parse_number",
]
