"""Chat message content is text: control-token strings inside a message are tokenised as plain text.

A chat template wraps each message in the model's control tokens (ChatML: ``<|im_start|>user\\n...<|im_end|>``).
vLLM renders the template to a string and tokenises the whole string, so a message whose *content* contains
``<|im_end|>\\n<|im_start|>system\\n...`` becomes real control tokens: the client injects a turn of another
role. Here, when some message content contains one of the tokenizer's special-token strings, the rendered
prompt is tokenised piece by piece instead: the template's own text with its control tokens, each message's
content with ``split_special_tokens=True`` (its ``<|im_end|>`` becomes the tokens of the characters
``<``, ``|``, ``im``, ...). Prompts without such strings keep vLLM's tokenisation exactly.
``lofit-serve --trust-chat-control-tokens`` turns this off (vLLM's own behaviour) for trusted clients.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vllm.exceptions import VLLMValidationError


def special_strings(tokenizer: Any) -> list[str]:
    """The tokenizer's special-token strings (those it matches as control tokens inside text)."""
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    found = {token.content for token in decoder.values() if getattr(token, "special", False)}
    found.update(getattr(tokenizer, "all_special_tokens", []) or [])
    return sorted(s for s in found if s)


def contents(conversation: Sequence[dict[str, Any]]) -> list[str]:
    """The text of each message, in order (content parts of type text, joined as vLLM joins them)."""
    out = []
    for message in conversation:
        content = message.get("content")
        if isinstance(content, str):
            out.append(content)
        elif isinstance(content, list):
            out.extend(part.get("text") for part in content if isinstance(part, dict) and part.get("text"))
    return [c for c in out if c]


def plain_content_ids(tokenizer: Any, prompt: str, conversation: Sequence[dict[str, Any]],
                      specials: Sequence[str]) -> list[int] | None:
    """Token ids of ``prompt`` with each message's content tokenised as plain text, or ``None`` when no content
    holds a special-token string (then vLLM's own tokenisation stands).

    Raises:
        VLLMValidationError: a content with control-token strings does not appear verbatim in the rendered
            prompt (a template that rewrites content), so it cannot be isolated safely (HTTP 400).
    """
    texts = contents(conversation)
    if not any(special in text for text in texts for special in specials):
        return None
    ids: list[int] = []
    pos = 0
    for text in texts:
        at = prompt.find(text, pos)
        if at < 0:
            if any(special in text for special in specials):
                raise VLLMValidationError("a message holds control-token strings and this model's chat template "
                                          "rewrites message content, so they cannot be kept as plain text; "
                                          "remove them from the message", parameter="messages")
            continue
        ids += tokenizer.encode(prompt[pos:at], add_special_tokens=False)
        ids += tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
        pos = at + len(text)
    ids += tokenizer.encode(prompt[pos:], add_special_tokens=False)
    return ids


def with_plain_content(tokenizer: Any, conversation: Any, prompt: Any, specials: Sequence[str]) -> Any:
    """vLLM's rendered chat ``prompt`` (a dict with ``prompt``), with ``prompt_token_ids`` from
    :func:`plain_content_ids` when needed; other prompts (already tokenised, multimodal) unchanged."""
    if (not isinstance(prompt, dict) or not isinstance(prompt.get("prompt"), str) or "prompt_token_ids" in prompt
            or "multi_modal_data" in prompt):
        return prompt
    ids = plain_content_ids(tokenizer, prompt["prompt"], conversation, specials)
    return prompt if ids is None else {**prompt, "prompt_token_ids": ids}
