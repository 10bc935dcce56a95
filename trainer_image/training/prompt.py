"""The text the model sees before a reply: rendered here and nowhere else (training, evaluation, samples).

The chat service renders the same template for serving (contract §2: the manifest's ``prompt_template``).
"""

from __future__ import annotations

from collections.abc import Mapping

PROMPT_TEMPLATE = "Instruction: {instruction}\nInput: {input}\nOutput: "


def render_prompt(record: Mapping[str, str], template: str = PROMPT_TEMPLATE) -> str:
    """The prompt for an Alpaca record (``instruction`` and an optional ``input``)."""
    return template.format(instruction=record["instruction"], input=record.get("input", ""))
