"""The evaluation tools' defaults for the model they evaluate.

An option left unset is chosen here, and each choice is printed on stderr
with its reason:

* --prefill-attention: glm_bidir for a model trained from scratch with the
  glm_bidir mask (it has never read a prompt causally), else causal;
* --prompt-parts (BABILong): the parts the training prompts had (none for
  the built-in BABILong-format data), else all three, as official;
* --chat (eval.generate): on for a model trained here (its rows were chat
  messages), else off;
* --lengths: the default lengths up to the model's context
  (max_position_embeddings, or --max-context), so that no cell is refused
  outright.

The first three come from the model directory's focusft.json
(`focusft_jax.training_record`); a model without one gets the official
defaults. An explicit option that contradicts the record is kept, with a
`warning:` line saying what the model was trained with.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Sequence

from focusft_jax.training_record import FILENAME, read_training_record


def _model_dir(checkpoint) -> Path | None:
    p = Path(str(checkpoint)).expanduser()
    return p if p.is_dir() else None  # a hub id: no record is read (nothing is downloaded for it)


class Defaults:
    """The record of `checkpoint` (None without one) and the choices made,
    printed through `log` and kept in `chosen` ({option: [value, reason]}) for
    the manifest."""

    def __init__(self, checkpoint, log: Callable[[str], None] | None = None):
        d = _model_dir(checkpoint) if checkpoint else None
        self.record = read_training_record(d) if d is not None else None
        self.where = str(d / FILENAME) if self.record is not None else None
        self.chosen: dict[str, list] = {}
        self.log = log or (lambda m: print(m, file=sys.stderr))

    def _choose(self, option: str, value, shown: str, why: str):
        self.chosen[option] = [value, why]
        self.log(f"{option} {shown} ({why})")
        return value

    def _warn(self, text: str) -> None:
        self.log(f"warning: {text}")

    @property
    def _scratch_glm_bidir(self) -> bool:
        r = self.record
        return r is not None and r["initialization"] == "from_scratch" and r["attention"] == "glm_bidir"

    def prefill_attention(self, explicit: str | None) -> str:
        r = self.record
        if explicit is None:
            if self._scratch_glm_bidir:
                return self._choose("--prefill-attention", "glm_bidir", "glm_bidir",
                                    f"trained from scratch with the glm_bidir mask, {self.where}")
            return "causal"
        if self._scratch_glm_bidir and explicit != "glm_bidir":
            self._warn(f"--prefill-attention {explicit}: this model was trained from scratch with the glm_bidir "
                       f"mask only ({self.where}); it has never read a prompt that way")
        elif r is not None and r["attention"] == "causal" and explicit == "glm_bidir":
            self._warn(f"--prefill-attention glm_bidir: this model was trained with causal attention ({self.where})")
        return explicit

    def prompt_parts(self, explicit: Sequence[str] | None, official: Sequence[str]) -> list[str]:
        trained = self.record["data"]["babilong_prompt_parts"] if self.record is not None else None
        if explicit is None:
            if trained is not None:
                shown = ",".join(trained) if trained else "''"
                return self._choose("--prompt-parts", list(trained), shown,
                                    f"the parts of the training prompts, {self.where}")
            return list(official)
        if trained is not None and list(explicit) != list(trained):
            self._warn(f"--prompt-parts {','.join(explicit) or repr('')}: the training prompts had "
                       f"{','.join(trained) or 'none of instruction, examples, post_prompt'} ({self.where})")
        return list(explicit)

    def chat(self, explicit: bool | None) -> bool:
        trained = self.record["data"]["chat_template"] if self.record is not None else None
        if explicit is None:
            if trained:
                return self._choose("--chat", True, "on", f"trained on chat messages, {self.where}")
            return False
        if trained is not None and explicit != trained:
            self._warn(f"--chat {'on' if explicit else 'off'}: this model was trained "
                       f"{'on chat messages' if trained else 'on plain text'} ({self.where})")
        return explicit

    def chat_template_mode(self, mode: str) -> None:
        """BABILong / RULER: --chat-template off for a model trained on chat messages."""
        if mode == "off" and self.record is not None and self.record["data"]["chat_template"]:
            self._warn(f"--chat-template off: this model was trained on chat messages ({self.where})")

    def lengths(self, defaults: Sequence, size: Callable[[object], int], context: int | None) -> list:
        """`defaults` whose size in tokens (`size`) is within `context`; all of
        them when the context is unknown; the shortest one when none is."""
        if context is None:
            return list(defaults)
        fit = [l for l in defaults if size(l) <= context] or [min(defaults, key=size)]
        if len(fit) < len(defaults):
            self._choose("--lengths", fit, ",".join(map(str, fit)),
                         f"the default lengths up to the model's context, {context} tokens")
        return fit
