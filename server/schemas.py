"""Request and response bodies of the server's own routes, ``POST /generate`` and ``/adapters`` (they make their part
of the OpenAPI schema; vLLM's routes bring vLLM's own models)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from server.steering import ADAPTER_NAME, ADAPTER_REFERENCE

STREAMED = {"text/event-stream": {"schema": {  # the 200 answer of `stream: true`: each server-sent event
    "type": "object", "required": ["data"], "description": "`data` is a JSON object, or `[DONE]` at the end",
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"},
                   "retry": {"type": "integer"}}}}}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- sampling shared by every generation route -------------------------------------------------------------

class Sampling(Strict):
    max_tokens: int = Field(64, ge=1, le=32768, description="tokens to generate at most")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 = greedy; vLLM's range, as OpenAI's")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=100000, description="0 = no top-k cut")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = Field(None, description="stop strings (at most 16)")
    ignore_eos: bool = Field(False, description="keep generating past the end-of-sequence token (benchmarks)")

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> list[str] | None:
        stops = [value] if isinstance(value, str) else value
        if stops is not None and (len(stops) > 16 or any(not s or len(s) > 256 for s in stops)):
            raise ValueError("stop: at most 16 non-empty strings of at most 256 characters")
        return stops


# -- POST /generate ----------------------------------------------------------------------------------------

class GenerateRequest(Sampling):
    prompt: str | list[str] = Field(..., description="one prompt, or a list (one result each)")
    model: str | None = Field(None, description="as on /v1: the served model's name (no adapter) or an adapter's "
                              "name (that adapter at strength 1); null = the served model")
    adapter: str | None = Field(None, pattern=ADAPTER_REFERENCE, description="an adapter's name (or "
                                "name@<content_sha256>: exactly that content); null = base model")
    adapter_scale: float | None = Field(None, ge=-100.0, le=100.0, allow_inf_nan=False,
                                        description="strength of `adapter` (or of the adapter named as `model`); "
                                                    "default 1")
    adapters: dict[str, float] | None = Field(None, description="weighted sum of loaded adapters {name: weight}")
    logprobs: int | None = Field(None, ge=0, le=20, description="log-probs of the top-N tokens at each step")
    stream: bool = False

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not 1 <= len(value) <= 64:
            raise ValueError("prompt: a list needs 1 to 64 prompts")
        return value

    @field_validator("adapter_scale", "adapters", mode="before")
    @classmethod
    def _no_booleans(cls, value: Any) -> Any:
        """JSON true/false are not strengths (pydantic would read them as 1.0/0.0; vLLM's routes refuse them)."""
        weights = value.values() if isinstance(value, dict) else [value]
        if any(isinstance(w, bool) for w in weights):
            raise ValueError("a strength must be a number, not true/false")
        return value

    @field_validator("adapters")
    @classmethod
    def _adapters(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is not None:
            import re

            if not 1 <= len(value) <= 16:
                raise ValueError("adapters: give 1 to 16 {name: weight} entries")
            for name, weight in value.items():
                if not re.fullmatch(ADAPTER_REFERENCE, name):
                    raise ValueError(f"adapters: invalid adapter name {name!r}")
                if not -100.0 <= weight <= 100.0:
                    raise ValueError(f"adapters: weight of {name!r} must be within [-100, 100]")
        return value


class AdapterUsed(BaseModel):
    name: str | None = Field(description="the adapter, the mix as 'a*w+b*w', or null for the base model")
    fingerprint: str | None = Field(description="content fingerprint of the combination (its prefix-cache key)")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TokenLogprob(BaseModel):
    token_id: int
    token: str
    logprob: float
    top: dict[str, float] = Field(description="top-N tokens at this step and their log-probs")


class GenerateResult(BaseModel):
    text: str
    token_ids: list[int]
    finish_reason: str | None
    usage: Usage
    adapter: AdapterUsed
    logprobs: list[TokenLogprob] | None = None


class GenerateBatchResult(BaseModel):
    results: list[GenerateResult]


# -- adapters ----------------------------------------------------------------------------------------------

class AdapterInfo(BaseModel):
    name: str
    task: str | None
    base_model: str
    num_heads: int
    heads: list[tuple[int, int]]
    content_sha256: str
    fingerprint: str = Field(description="what requests with this adapter alone key the prefix cache by")
    metrics: dict
    created_at: str | None
    loaded_at: str
    source: str = Field("adapters-dir", description="where its files came from: 'adapters-dir' (the server's "
                        "folder, or an upload without a store) or 'store' (--adapter-store)")
    requests_served: int


class AdapterList(BaseModel):
    adapters: list[AdapterInfo]
    skipped: dict[str, str] = Field(default_factory=dict,
                                    description="adapter folders that failed to load at start-up, with the reason")


class LoadAdapterRequest(Strict):
    name: str = Field(..., pattern=ADAPTER_NAME, description="folder name under the server's adapters directory")


class LoadAdapterResult(BaseModel):
    adapter: AdapterInfo
    changed: bool = Field(description="false when the same content was already loaded under this name")
    load_ms: float


# -- errors ------------------------------------------------------------------------------------------------

class ErrorBody(BaseModel):
    message: str
    type: str
    code: int


class ErrorResponse(BaseModel):
    error: ErrorBody
