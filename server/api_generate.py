"""``POST /generate``: the product's own route — a prompt (or several) and an adapter choice."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import StreamingResponse

from server.auth import require_inference_key
from server.engine import Choice, check_length, choose, generate, sampling_params
from server.schemas import STREAMED, AdapterUsed, GenerateRequest, GenerateResult, TokenLogprob, Usage

router = APIRouter(dependencies=[Depends(require_inference_key)])


def request_weights(body: GenerateRequest) -> dict[str, float] | None:
    if body.adapter is not None and body.adapters is not None:
        raise HTTPException(422, "give either 'adapter' (with 'adapter_scale') or 'adapters', not both")
    if body.adapters is not None:
        return dict(body.adapters)
    if body.adapter is not None:
        return {body.adapter: body.adapter_scale}
    return None


def adapter_used(choice: Choice) -> AdapterUsed:
    return AdapterUsed(name=None if choice.weights is None else choice.label,
                       fingerprint=None if choice.combination is None else choice.combination.fingerprint)


def token_logprobs(completion: Any) -> list[TokenLogprob] | None:
    if completion.logprobs is None:
        return None
    out = []
    for token_id, step in zip(completion.token_ids, completion.logprobs, strict=False):
        chosen = step[token_id]
        out.append(TokenLogprob(token_id=token_id, token=chosen.decoded_token or "", logprob=chosen.logprob,
                                top={(lp.decoded_token or str(t)): lp.logprob for t, lp in step.items()}))
    return out


def result_of(output: Any, choice: Choice) -> GenerateResult:
    completion = output.outputs[0]
    prompt_tokens, completion_tokens = len(output.prompt_token_ids), len(completion.token_ids)
    return GenerateResult(text=completion.text, token_ids=list(completion.token_ids),
                          finish_reason=completion.finish_reason,
                          usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                      total_tokens=prompt_tokens + completion_tokens),
                          adapter=adapter_used(choice), logprobs=token_logprobs(completion))


@router.post("/generate", response_model=GenerateResult | list[GenerateResult],
             responses={200: {"content": STREAMED, "description": "a result, a list of results, or events"},
                        400: {"description": "prompt too long, or sampling the engine refuses"},
                        404: {"description": "unknown adapter"}})
async def post_generate(body: GenerateRequest, request: Request) -> Any:
    """Generate for one prompt (an object back) or a list of prompts (a list back), steered by the adapter
    choice. ``stream: true`` (one prompt) sends server-sent events: text deltas, then the result, then
    ``[DONE]``."""
    state = request.app.state.lofit
    choice = choose(state.registry, request_weights(body))
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    tokenizer = state.tokenizer
    prompt_ids = [tokenizer.encode(p) for p in prompts]
    for ids in prompt_ids:
        check_length(state.settings, ids, body.max_tokens)
    if body.stream:
        if len(prompts) != 1:
            raise HTTPException(422, "stream: true takes a single prompt")
        params = sampling_params(body, body.max_tokens, True, choice, body.logprobs)
        return StreamingResponse(stream_events(state, prompt_ids[0], params, choice),
                                 media_type="text/event-stream")
    params = sampling_params(body, body.max_tokens, False, choice, body.logprobs)

    async def one(ids: list[int]) -> GenerateResult:
        final = None
        async for output in generate(state, ids, params.clone(), choice, "/generate"):
            final = output
        return result_of(final, choice)

    results = await asyncio.gather(*(one(ids) for ids in prompt_ids))
    return results[0] if isinstance(body.prompt, str) else list(results)


async def stream_events(state: Any, prompt_ids: list[int], params: Any, choice: Choice):
    text, token_ids, last = "", [], None
    async for output in generate(state, prompt_ids, params, choice, "/generate"):
        completion = output.outputs[0]
        text += completion.text
        token_ids += completion.token_ids
        last = output
        event = {"text": completion.text, "token_ids": list(completion.token_ids),
                 "finish_reason": completion.finish_reason}
        yield f"data: {json.dumps(event)}\n\n"
    usage = Usage(prompt_tokens=len(prompt_ids), completion_tokens=len(token_ids),
                  total_tokens=len(prompt_ids) + len(token_ids))
    final = GenerateResult(text=text, token_ids=token_ids, finish_reason=last.outputs[0].finish_reason,
                           usage=usage, adapter=adapter_used(choice))
    yield f"data: {json.dumps({'result': final.model_dump()})}\n\n"
    yield "data: [DONE]\n\n"
