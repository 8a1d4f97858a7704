"""Built-in synthetic long-context chat data (the tiny default's training set).

Two kinds (`data.builtin.kind`):

* ``babilong``: a BABILong-format task: simulated bAbI facts (qa1..qa5)
  hidden in generated background text of a chosen token budget, asked as one
  user message in BABILong's prompt layout with every optional part switched
  off (`<context>...</context>\\n\\nQuestion: ...`), answered by the
  assistant with the target alone. So `python -m eval.babilong --prompt-parts
  none ...` evaluates a model in exactly the format it was trained on.
* ``niah``: a RULER needle-in-a-haystack task whose haystack needs no corpus
  (niah_single_1: noise sentences; niah_multikey_2 / _3: needle lines), made
  by the RULER evaluation's own generator (`evaluation.ruler_data.Niah`): the
  user message is the official task text, the assistant answers with the
  official answer prefix followed by the value(s) (`<prefix> 1234567.`), so
  `python -m eval.ruler --tasks niah_single_1 ...` (which pre-fills the same
  prefix) evaluates the format it was trained on. Samples are drawn from
  their own seeds ("builtin:..."), never the evaluation's.
"""
from __future__ import annotations

import random
from typing import Iterator

from focusft_jax.data.babi import BabilongGenerator, TokenCounter, babi_story, gpt2_counter
from focusft_jax.errors import DataError


def babilong_prompt(context: str, question: str) -> str:
    """BABILong's default template with instruction, examples and post_prompt
    empty (the official template then strips down to this)."""
    return f"<context>\n{context.strip()}\n</context>\n\nQuestion: {question}"


def builtin_records(cfg, counter: TokenCounter | None = None) -> Iterator[dict]:
    """Chat records {"messages": [user, assistant]} of `cfg` (a
    config.BuiltinDataConfig): num_examples examples cycling over its tasks,
    each with a context budget drawn from cfg.context_tokens. Deterministic
    in cfg.seed; background from the built-in filler (babilong) or RULER's
    noise / needle lines (niah)."""
    if cfg.kind == "niah":
        yield from niah_records(cfg, counter)
        return
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


def niah_records(cfg, counter: TokenCounter | None = None) -> Iterator[dict]:
    """Chat records of RULER niah tasks (`cfg.tasks`, corpus-free ones only),
    cycling over the tasks; a haystack of about `budget` tokens (drawn from
    cfg.context_tokens, counted with `counter`) is that many tokens' worth of
    haystack lines (at least the task's minimum)."""
    from focusft_jax.evaluation.ruler_data import BENCH, NEEDLE, NOISE, Niah

    counter = counter or gpt2_counter()
    gens, line_tokens = {}, {}
    for task in cfg.tasks:
        spec = BENCH["tasks"].get(task)
        if spec is None or spec["task"] != "niah" or spec["args"]["type_haystack"] == "essay":
            ok = [t for t, c in BENCH["tasks"].items() if c["task"] == "niah" and c["args"]["type_haystack"] != "essay"]
            raise DataError(f"data.builtin.tasks: {task!r} is not a corpus-free RULER niah task; expected one of {ok}")
        gens[task] = Niah(spec["args"])
        line = NOISE if spec["args"]["type_haystack"] == "noise" else NEEDLE.format(
            type_needle_v="numbers", key="word", value="1234567")
        line_tokens[task] = max(1, counter("\n" + line))
    rng = random.Random(f"builtin:{cfg.seed}")
    for i in range(cfg.num_examples):
        task = cfg.tasks[i % len(cfg.tasks)]
        gen = gens[task]
        units = max(gen.min_units, round(rng.choice(cfg.context_tokens) / line_tokens[task]))
        built = gen.build(units, random.Random(f"builtin:{cfg.seed}:{task}:{i}"), i)
        yield {
            "messages": [
                {"role": "user", "content": built.task_text},
                {"role": "assistant", "content": f"{built.answer_prefix} {', '.join(built.outputs)}."},
            ]
        }
