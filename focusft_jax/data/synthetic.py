"""Built-in synthetic long-context chat data (the tiny default's training set).

Each example is a BABILong-format task: simulated bAbI facts (qa1..qa5)
hidden in generated background text of a chosen token budget, asked as one
user message in BABILong's prompt layout with every optional part switched
off (`<context>...</context>\\n\\nQuestion: ...`), answered by the assistant
with the target alone. So `python -m eval.babilong --prompt-parts none ...`
evaluates a model in exactly the format it was trained on.
"""
from __future__ import annotations

import random
from typing import Iterator

from focusft_jax.data.babi import BabilongGenerator, TokenCounter, babi_story, gpt2_counter


def babilong_prompt(context: str, question: str) -> str:
    """BABILong's default template with instruction, examples and post_prompt
    empty (the official template then strips down to this)."""
    return f"<context>\n{context.strip()}\n</context>\n\nQuestion: {question}"


def builtin_records(cfg, counter: TokenCounter | None = None) -> Iterator[dict]:
    """Chat records {"messages": [user, assistant]} of `cfg` (a
    config.BuiltinDataConfig): num_examples examples cycling over its tasks,
    each with a context budget drawn from cfg.context_tokens. Deterministic
    in cfg.seed; background from the built-in filler."""
    gen = BabilongGenerator(seed=cfg.seed, counter=counter or gpt2_counter())
    rng = random.Random(f"builtin:{cfg.seed}")
    for i in range(cfg.num_examples):
        task = cfg.tasks[i % len(cfg.tasks)]
        facts, question, answer = babi_story(task, random.Random(f"builtin:{cfg.seed}:{task}:{i}"))
        budget = rng.choice(cfg.context_tokens)
        context = gen.hide(facts, budget, rng)
        yield {
            "messages": [
                {"role": "user", "content": babilong_prompt(context, question)},
                {"role": "assistant", "content": answer},
            ]
        }
