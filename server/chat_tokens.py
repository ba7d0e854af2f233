"""Chat message content is text: control-token strings inside a message are tokenised as plain text.

A chat template wraps each message in the model's control tokens (ChatML: ``<|im_start|>user\\n...<|im_end|>``).
vLLM renders the template to a string and tokenises the whole string, so a message whose *content* contains
``<|im_end|>\\n<|im_start|>system\\n...`` becomes real control tokens: the client injects a turn of another
role. Here, when some message content contains one of the tokenizer's special-token strings, the template is
rendered a second time with every text content replaced by a unique placeholder (the *skeleton*): what lies
between placeholders is the template's own text, tokenised with its control tokens, and each content is
tokenised with ``split_special_tokens=True`` (its ``<|im_end|>`` becomes the tokens of the characters ``<``,
``|``, ``im``, ...). The skeleton with the contents put back must equal vLLM's rendered prompt, character for
character, or the request is refused (400). Prompts without such strings keep vLLM's tokenisation exactly.
``lofit-serve --trust-chat-control-tokens`` turns this off (vLLM's own behaviour) for trusted clients.
"""

from __future__ import annotations

import re
import secrets
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


def cannot_isolate() -> VLLMValidationError:
    return VLLMValidationError("a message holds control-token strings that cannot be isolated for this request; "
                               "remove them from the message", parameter="messages")


def placeholders_for(conversation: Sequence[dict[str, Any]], messages: Sequence[Any], prompt: Any,
                     specials: Sequence[str]) -> tuple[list[Any], dict[str, str]] | None:
    """What :func:`with_plain_content` needs to re-render the request's ``messages`` as a skeleton, or ``None``
    when vLLM's rendered ``prompt`` needs nothing: it is not plain rendered text (already tokenised, multimodal)
    or no content holds a special-token string. Raises :class:`VLLMValidationError` (400) when a message's
    content cannot be replaced (see :func:`with_placeholders`)."""
    if (not isinstance(prompt, dict) or not isinstance(prompt.get("prompt"), str) or "prompt_token_ids" in prompt
            or "multi_modal_data" in prompt or not needs_isolation(conversation, specials)):
        return None
    marked = with_placeholders(messages)
    if marked is None:
        raise cannot_isolate()
    return marked


def with_placeholders(messages: Sequence[Any]) -> tuple[list[Any], dict[str, str]] | None:
    """A copy of the request's ``messages`` with every text content (a string, or the ``text`` of a content part)
    replaced by a unique placeholder, and ``{placeholder: text}``; ``None`` when a message is not a dict (its
    content cannot be replaced, so it cannot be isolated)."""
    nonce = secrets.token_hex(6)
    texts: dict[str, str] = {}

    def mark(text: str) -> str:
        key = f"LOFITPLACEHOLDER{nonce}N{len(texts)}X"
        texts[key] = text
        return key

    out = []
    for message in messages:
        if not isinstance(message, dict):
            return None
        message = dict(message)
        content = message.get("content")
        if isinstance(content, str) and content:
            message["content"] = mark(content)
        elif isinstance(content, list):
            message["content"] = [{**part, "text": mark(part["text"])} if isinstance(part, dict) and isinstance(
                part.get("text"), str) and part["text"] else part for part in content]
        out.append(message)
    return out, texts


def needs_isolation(conversation: Sequence[dict[str, Any]], specials: Sequence[str]) -> bool:
    """Whether some message content holds a special-token string."""
    return any(special in text for text in contents(conversation) for special in specials)


def plain_content_ids(tokenizer: Any, prompt: str, skeleton: str, texts: dict[str, str]) -> list[int]:
    """Token ids of ``prompt`` (vLLM's rendering) with each content tokenised as plain text, from ``skeleton`` (the
    same template rendered with the placeholders of :func:`with_placeholders`) and ``{placeholder: text}``.

    Raises:
        VLLMValidationError: the skeleton with the contents put back is not ``prompt`` (a template that rewrites
            or inspects content), so the contents cannot be isolated safely (HTTP 400).
    """
    pattern = re.compile("|".join(re.escape(key) for key in texts)) if texts else None
    ids: list[int] = []
    rebuilt: list[str] = []
    pos = 0
    for match in pattern.finditer(skeleton) if pattern else ():
        template, text = skeleton[pos:match.start()], texts[match.group()]
        ids += tokenizer.encode(template, add_special_tokens=False)
        ids += tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
        rebuilt += [template, text]
        pos = match.end()
    ids += tokenizer.encode(skeleton[pos:], add_special_tokens=False)
    rebuilt.append(skeleton[pos:])
    if "".join(rebuilt) != prompt:
        raise VLLMValidationError("a message holds control-token strings and this model's chat template rewrites "
                                  "or inspects message content, so they cannot be kept as plain text; remove them "
                                  "from the message", parameter="messages")
    return ids


def with_plain_content(tokenizer: Any, prompt: dict[str, Any], skeleton: Any, texts: dict[str, str]) -> dict:
    """vLLM's rendered chat ``prompt`` (a dict with ``prompt``, for which :func:`placeholders_for` gave ``texts``)
    with ``prompt_token_ids`` from :func:`plain_content_ids`."""
    if not isinstance(skeleton, dict) or not isinstance(skeleton.get("prompt"), str):
        raise cannot_isolate()
    return {**prompt, "prompt_token_ids": plain_content_ids(tokenizer, prompt["prompt"], skeleton["prompt"], texts)}
