"""``POST /generate``: the product's own route — a prompt (or several) and an adapter choice.

Its steering follows :mod:`server.steering` (``adapter`` + ``adapter_scale``, or ``adapters``); a non-streamed
request whose client goes away is aborted in the engine (vLLM's ``with_cancellation``), as a stream is.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from vllm.exceptions import GenerationError, VLLMValidationError

from server.schemas import STREAMED, AdapterUsed, GenerateRequest, GenerateResult, TokenLogprob, Usage
from server.steering import Steering
from server.vllm_api import with_cancellation

router = APIRouter()


class PromptTooLong(ValueError):
    """The prompt (plus ``max_tokens``) does not fit the server's limits."""


def request_steering(state: Any, body: GenerateRequest) -> Steering | None:
    """The body's steering, by the rules of every route (:mod:`server.steering`): ``model``, ``adapter``,
    ``adapter_scale``, ``adapters``. A malformed choice is this route's 422; an adapter not loaded, 404."""
    fields = {"adapter": body.adapter, "adapter_scale": body.adapter_scale, "adapters": body.adapters}
    try:
        return state.resolver.resolve(body.model, fields)
    except VLLMValidationError as exc:  # this route's 422 body, like the rest of its validation (server/app.py)
        raise RequestValidationError([{"loc": ("body", exc.parameter or "adapter"), "msg": exc.args[0],
                                       "type": "value_error"}]) from None


def adapter_used(state: Any, steering: Steering | None) -> AdapterUsed:
    if steering is None or not steering.weights:
        return AdapterUsed(name=None, fingerprint=None)
    return AdapterUsed(name=steering.label, fingerprint=state.registry.resolve(steering.weights).fingerprint)


def token_logprobs(token_ids: Any, logprobs: Any) -> list[TokenLogprob] | None:
    if logprobs is None:
        return None
    out = []
    for token_id, step in zip(token_ids, logprobs, strict=False):
        chosen = step[token_id]
        out.append(TokenLogprob(token_id=token_id, token=chosen.decoded_token or "", logprob=chosen.logprob,
                                top={(lp.decoded_token or str(t)): lp.logprob for t, lp in step.items()}))
    return out


def check_length(settings: Any, prompt_ids: list[int], max_tokens: int) -> None:
    if not prompt_ids:
        raise PromptTooLong("the prompt is empty")
    if len(prompt_ids) > settings.prompt_limit:
        raise PromptTooLong(f"the prompt has {len(prompt_ids)} tokens; this server takes at most "
                            f"{settings.prompt_limit}")
    if len(prompt_ids) + max_tokens > settings.max_model_len:
        raise PromptTooLong(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds the "
                            f"model length {settings.max_model_len}")


def sampling_params(body: GenerateRequest, stream: bool) -> Any:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
        seed=body.seed, stop=body.stop, ignore_eos=body.ignore_eos, logprobs=body.logprobs,
        output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY)


async def run(state: Any, prompt_ids: list[int], params: Any, steering: Steering | None, request_id: str):
    """The engine's outputs for one prompt; an engine-side refusal (finish reason ``error``) raises."""
    from vllm.inputs import TokensPrompt

    async for output in state.engine.generate(TokensPrompt(prompt_token_ids=prompt_ids), params, request_id,
                                              lora_request=steering):
        if output.outputs and output.outputs[0].finish_reason == "error":
            raise GenerationError("the engine refused or failed the request")
        yield output


@router.post("/generate", response_model=None,
             responses={200: {"model": GenerateResult | list[GenerateResult],
                              "content": STREAMED, "description": "a result, a list of results, or events"},
                        400: {"description": "prompt too long, or sampling the engine refuses"},
                        404: {"description": "unknown adapter"}})
@with_cancellation
async def post_generate(body: GenerateRequest, raw_request: Request) -> Any:
    """Generate for one prompt (an object back) or a list of prompts (a list back), steered by the adapter
    choice. ``stream: true`` (one prompt) sends server-sent events: text deltas (with their ``logprobs`` when
    asked for), then the result, then ``[DONE]``."""
    state = raw_request.app.state.lofit
    steering = request_steering(state, body)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    prompt_ids = [state.tokenizer.encode(p) for p in prompts]
    for ids in prompt_ids:
        check_length(state.settings, ids, body.max_tokens)
    request_id = f"generate-{raw_request.headers.get('x-request-id', '')}"
    if body.stream:
        if len(prompts) != 1:
            raise HTTPException(422, "stream: true takes a single prompt")
        events = stream_events(state, prompt_ids[0], sampling_params(body, True), steering, request_id)
        return StreamingResponse(events, media_type="text/event-stream")
    params = sampling_params(body, False)

    async def one(i: int, ids: list[int]) -> GenerateResult:
        final = None
        async for output in run(state, ids, params.clone(), steering, f"{request_id}-{i}"):
            final = output
        completion = final.outputs[0]
        return result(state, ids, completion.text, list(completion.token_ids), completion.finish_reason, steering,
                      token_logprobs(completion.token_ids, completion.logprobs))

    results = await asyncio.gather(*(one(i, ids) for i, ids in enumerate(prompt_ids)))
    content = results[0].model_dump() if isinstance(body.prompt, str) else [r.model_dump() for r in results]
    return JSONResponse(content)


def result(state: Any, prompt_ids: list[int], text: str, token_ids: list[int], finish_reason: str | None,
           steering: Steering | None, logprobs: list[TokenLogprob] | None) -> GenerateResult:
    usage = Usage(prompt_tokens=len(prompt_ids), completion_tokens=len(token_ids),
                  total_tokens=len(prompt_ids) + len(token_ids))
    return GenerateResult(text=text, token_ids=token_ids, finish_reason=finish_reason, usage=usage,
                          adapter=adapter_used(state, steering), logprobs=logprobs)


async def stream_events(state: Any, prompt_ids: list[int], params: Any, steering: Steering | None,
                        request_id: str):
    text, token_ids, logprobs, finish_reason = "", [], [], None
    try:
        async for output in run(state, prompt_ids, params, steering, request_id):
            completion = output.outputs[0]
            delta = token_logprobs(completion.token_ids, completion.logprobs)
            text += completion.text
            token_ids += completion.token_ids
            logprobs += delta or []
            finish_reason = completion.finish_reason
            event = {"text": completion.text, "token_ids": list(completion.token_ids),
                     "finish_reason": completion.finish_reason}
            if delta is not None:
                event["logprobs"] = [lp.model_dump() for lp in delta]
            yield f"data: {json.dumps(event)}\n\n"
    except (HTTPException, ValueError, GenerationError) as exc:  # after the 200: an error event, then the end
        message = exc.detail if isinstance(exc, HTTPException) else str(exc)
        yield f"data: {json.dumps({'error': {'message': message, 'type': type(exc).__name__}})}\n\n"
        yield "data: [DONE]\n\n"
        return
    final = result(state, prompt_ids, text, token_ids, finish_reason, steering,
                   logprobs if params.logprobs is not None else None)
    yield f"data: {json.dumps({'result': final.model_dump()})}\n\n"
    yield "data: [DONE]\n\n"
