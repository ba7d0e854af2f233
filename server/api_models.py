"""``GET /v1/models/{model}``: one card of vLLM's model list (the base model, or an adapter with its ``parent``).

``GET /v1/models`` itself is vLLM's own route; the OpenAI SDK's ``models.retrieve`` needs this one, which vLLM's
server lacks. Answers exactly the card ``GET /v1/models`` lists, or vLLM's 404.
"""

from __future__ import annotations

from http import HTTPStatus

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from server.vllm_api import create_error_response

router = APIRouter()


@router.get("/v1/models/{model}", responses={404: {"description": "no such model or adapter"}})
async def retrieve_model(model: str, raw_request: Request) -> JSONResponse:
    """The model card of ``model``."""
    cards = await raw_request.app.state.openai_serving_models.show_available_models()
    for card in cards.data:
        if card.id == model:
            return JSONResponse(card.model_dump())
    err = create_error_response(f"The model `{model}` does not exist.", "NotFoundError", HTTPStatus.NOT_FOUND,
                                param="model")
    return JSONResponse(err.model_dump(), status_code=404)
