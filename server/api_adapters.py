"""Adapters over HTTP: list and show (inference key); load, upload and unload (admin key), under ``/adapters`` and
under vLLM's runtime adapter calls ``POST /v1/load_lora_adapter`` / ``POST /v1/unload_lora_adapter``
(``vllm/entrypoints/serve/lora/api_router.py``), so tools written for vLLM's adapter loading work unchanged.

vLLM's calls take a folder: ``lora_path`` must be the adapter's own folder in the server's adapters directory
(``{"lora_name": "x", "lora_path": "x"}``, or that folder's full path); anything else is refused, so the calls
cannot make the server read files elsewhere. Loading is idempotent (the same content again changes nothing,
new content reloads the name), unloading a name that is not loaded is not an error — as under ``/adapters``.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request, UploadFile
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel

from lofit.adapter import CONFIG_FILE, TENSORS_FILE
from server.registry import InvalidAdapter, now_ms
from server.schemas import AdapterInfo, AdapterList, LoadAdapterRequest, LoadAdapterResult
from server.vllm_api import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest

router = APIRouter()


class UnloadResult(BaseModel):
    name: str
    unloaded: bool


@router.get("/adapters", response_model=AdapterList)
async def list_adapters(request: Request) -> AdapterList:
    state = request.app.state.lofit
    return AdapterList(adapters=[r.info() for _, r in sorted(state.registry.records.items())],
                       skipped=dict(state.skipped_adapters))


@router.get("/adapters/{name}", response_model=AdapterInfo, responses={404: {"description": "not loaded"}})
async def show_adapter(name: str, request: Request) -> AdapterInfo:
    record = request.app.state.lofit.registry.records.get(name)
    if record is None:
        raise HTTPException(404, f"adapter {name!r} is not loaded")
    return record.info()


async def _load(request: Request, name: str) -> LoadAdapterResult:
    state = request.app.state.lofit
    start = now_ms()
    try:
        record, changed = await state.registry.load(name)
    except InvalidAdapter:
        state.metrics.adapter_loads.labels("load", "rejected").inc()
        raise
    state.metrics.adapter_loads.labels("load", "ok").inc()
    state.metrics.adapters_loaded.set(len(state.registry.records))
    return LoadAdapterResult(adapter=record.info(), changed=changed, load_ms=now_ms() - start)


async def _unload(request: Request, name: str) -> bool:
    state = request.app.state.lofit
    unloaded = await state.registry.unload(name)
    state.metrics.adapter_loads.labels("unload", "ok" if unloaded else "noop").inc()
    state.metrics.adapters_loaded.set(len(state.registry.records))
    return unloaded


@router.post("/adapters", response_model=LoadAdapterResult, responses={400: {"description": "invalid adapter"}})
async def load_adapter_by_name(body: LoadAdapterRequest, request: Request) -> LoadAdapterResult:
    """Load (or reload, if its content changed) the adapter in folder ``name`` of the adapters directory."""
    return await _load(request, body.name)


@router.put("/adapters/{name}", response_model=LoadAdapterResult, responses={400: {"description": "invalid adapter"}})
async def upload_adapter(name: str, request: Request, adapter_config: UploadFile,
                         adapter_tensors: UploadFile) -> LoadAdapterResult:
    """Upload ``adapter_config.json`` and ``adapter.safetensors`` as adapter ``name``: validated against the
    served model, written atomically into the adapters directory (with the directory's permissions), then
    loaded."""
    state = request.app.state.lofit
    state.registry.path_for(name)  # refuse a bad name before writing anything
    limit = state.settings.max_upload_bytes
    state.settings.adapters_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".upload-{name}.", dir=state.settings.adapters_dir))
    try:
        for upload, filename in ((adapter_config, CONFIG_FILE), (adapter_tensors, TENSORS_FILE)):
            data = await upload.read(limit + 1)
            if len(data) > limit:
                raise InvalidAdapter(f"{filename} is larger than the upload limit ({limit} bytes)")
            (staging / filename).write_bytes(data)
        await state.registry.install(name, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return await _load(request, name)


@router.delete("/adapters/{name}", response_model=UnloadResult,
               responses={400: {"description": "invalid adapter name"}})
async def unload_adapter(name: str, request: Request) -> UnloadResult:
    """Unload ``name`` (its folder stays on disk). Requests already running finish with it. Idempotent."""
    return UnloadResult(name=name, unloaded=await _unload(request, name))


@router.post("/v1/load_lora_adapter", response_class=PlainTextResponse,
             responses={400: {"description": "invalid adapter, or a path outside the adapters directory"}})
async def load_lora_adapter(body: LoadLoRAAdapterRequest, request: Request) -> PlainTextResponse:
    """vLLM's call: load adapter ``lora_name`` from its folder ``lora_path`` in the adapters directory."""
    registry = request.app.state.lofit.registry
    folder = registry.path_for(body.lora_name)
    given = Path(body.lora_path)
    target = given if given.is_absolute() else registry.directory / given
    if given.name != body.lora_name or target.resolve() != folder:
        raise InvalidAdapter(f"lora_path must be adapter {body.lora_name!r}'s own folder in the server's adapters "
                             f"directory (give {body.lora_name!r}); upload it first with PUT /adapters/"
                             f"{body.lora_name}")
    result = await _load(request, body.lora_name)
    verb = "added successfully" if result.changed else "was already loaded with this content"
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' {verb}.")


@router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse,
             responses={400: {"description": "invalid adapter name"}})
async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, request: Request) -> PlainTextResponse:
    """vLLM's call: unload adapter ``lora_name`` (idempotent: not loaded is not an error)."""
    unloaded = await _unload(request, body.lora_name)
    verb = "removed successfully" if unloaded else "was not loaded"
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' {verb}.")
