"""OpenAI-compatible routes. ``model`` is the base model's name (no adapter) or an adapter's name, as vLLM
does for LoRA; ``GET /v1/models`` lists both."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import StreamingResponse

from server.auth import require_inference_key
from server.engine import Choice, check_length, choose, generate, sampling_params
from server.registry import UnknownAdapter
from server.schemas import (
    STREAMED,
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    Usage,
)

router = APIRouter(prefix="/v1", dependencies=[Depends(require_inference_key)])


def choice_for_model(state: Any, model: str) -> Choice:
    if model == state.settings.base_name:
        return choose(state.registry, None)
    if model not in state.registry.records:
        raise UnknownAdapter(f"the model {model!r} does not exist: use {state.settings.base_name!r} or a "
                             f"loaded adapter ({', '.join(sorted(state.registry.records)) or 'none'})")
    return choose(state.registry, {model: 1.0})


def _usage(prompt: int, completion: int) -> Usage:
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _sse(payload: Any) -> str:
    return f"data: {json.dumps(payload)}\n\n"


@router.get("/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    state = request.app.state.lofit
    base = state.settings.base_name
    cards = [ModelCard(id=base, created=state.started, root=str(state.settings.model), parent=None)]
    cards += [ModelCard(id=name, created=state.started, root=str(record.path), parent=base)
              for name, record in sorted(state.registry.records.items())]
    return ModelList(data=cards)


@router.post("/completions", response_model=CompletionResponse,
             responses={200: {"content": STREAMED, "description": "the completion, or events"},
                        404: {"description": "unknown model"},
                        400: {"description": "prompt too long, or sampling the engine refuses"}})
async def completions(body: CompletionRequest, request: Request) -> Any:
    state = request.app.state.lofit
    choice = choice_for_model(state, body.model)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not 1 <= len(prompts) <= 64:
        raise HTTPException(422, "prompt: give 1 to 64 prompts")
    prompt_ids = [state.tokenizer.encode(p) for p in prompts]
    for ids in prompt_ids:
        check_length(state.settings, ids, body.max_tokens)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        if len(prompts) != 1:
            raise HTTPException(422, "stream: true takes a single prompt")
        params = sampling_params(body, body.max_tokens, True, choice, body.logprobs)

        async def events():
            async for output in generate(state, prompt_ids[0], params, choice, "/v1/completions"):
                c = output.outputs[0]
                yield _sse({"id": rid, "object": "text_completion", "created": created, "model": body.model,
                            "choices": [{"index": 0, "text": c.text, "logprobs": None,
                                         "finish_reason": c.finish_reason}]})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")
    params = sampling_params(body, body.max_tokens, False, choice, body.logprobs)

    async def one(ids: list[int]) -> Any:
        final = None
        async for output in generate(state, ids, params.clone(), choice, "/v1/completions"):
            final = output
        return final

    outputs = await asyncio.gather(*(one(ids) for ids in prompt_ids))
    choices = [CompletionChoice(index=i, text=o.outputs[0].text, finish_reason=o.outputs[0].finish_reason,
                                logprobs=_openai_logprobs(o.outputs[0]))
               for i, o in enumerate(outputs)]
    usage = _usage(sum(len(o.prompt_token_ids) for o in outputs), sum(len(o.outputs[0].token_ids) for o in outputs))
    return CompletionResponse(id=rid, created=created, model=body.model, choices=choices, usage=usage)


def _openai_logprobs(completion: Any) -> dict | None:
    if completion.logprobs is None:
        return None
    tokens, values, tops = [], [], []
    for token_id, step in zip(completion.token_ids, completion.logprobs, strict=False):
        tokens.append(step[token_id].decoded_token or "")
        values.append(step[token_id].logprob)
        tops.append({(lp.decoded_token or str(t)): lp.logprob for t, lp in step.items()})
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops}


@router.post("/chat/completions", response_model=ChatCompletionResponse,
             responses={200: {"content": STREAMED, "description": "the completion, or events"},
                        404: {"description": "unknown model"},
                        400: {"description": "prompt too long, or sampling the engine refuses"}})
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    state = request.app.state.lofit
    choice = choice_for_model(state, body.model)
    messages = [m.model_dump() for m in body.messages]
    text = state.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = state.tokenizer.encode(text, add_special_tokens=False)
    max_tokens = body.max_completion_tokens or body.max_tokens or max(1, state.settings.max_model_len
                                                                          - len(prompt_ids))
    check_length(state.settings, prompt_ids, max_tokens)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        params = sampling_params(body, max_tokens, True, choice)

        async def events():
            first = True
            async for output in generate(state, prompt_ids, params, choice, "/v1/chat/completions"):
                c = output.outputs[0]
                delta = {"role": "assistant", "content": c.text} if first else {"content": c.text}
                first = False
                yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                            "choices": [{"index": 0, "delta": delta, "finish_reason": c.finish_reason}]})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")
    final = None
    async for output in generate(state, prompt_ids, sampling_params(body, max_tokens, False, choice), choice,
                                 "/v1/chat/completions"):
        final = output
    c = final.outputs[0]
    return ChatCompletionResponse(id=rid, created=created, model=body.model,
                                  choices=[ChatChoice(index=0, message=AssistantMessage(content=c.text),
                                                      finish_reason=c.finish_reason)],
                                  usage=_usage(len(prompt_ids), len(c.token_ids)))
