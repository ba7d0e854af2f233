"""Adapters over HTTP: list and show (inference key); load, upload and unload (admin key), under ``/adapters`` and
under vLLM's runtime adapter calls ``POST /v1/load_lora_adapter`` / ``POST /v1/unload_lora_adapter``
(``vllm/entrypoints/serve/lora/api_router.py``), so tools written for vLLM's adapter loading work unchanged.

vLLM's calls take a folder: ``lora_path`` must be the adapter's own folder in the server's adapters directory
(``{"lora_name": "x", "lora_path": "x"}``, or that folder's full path) or, with ``--adapter-store``, its place
in the store (``x`` or ``<store URI>/x``); anything else is refused, so the calls cannot make the server read
files elsewhere. Loading is idempotent (the same content again changes nothing, new content reloads the name),
unloading a name that is not loaded is not an error — as under ``/adapters``.

With ``--adapter-store`` (:mod:`server.adapter_store`): an upload is validated, written through to the store, then
loaded; loading by name reads the adapters directory's folder when there is one, else the store;
``POST /adapters/{name}/reload`` reads the store now (without a store: the folder); ``DELETE
/adapters/{name}?purge=true`` also removes the adapter from the store (its pinned references stay readable).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request, UploadFile
from fastapi.responses import PlainTextResponse, Response
from pydantic import BaseModel

from lofit.adapter import CONFIG_FILE, TENSORS_FILE
from server.registry import InvalidAdapter, NotRegularFile, Record, UnknownAdapter, now_ms, read_regular_file
from server.schemas import AdapterInfo, AdapterList, LoadAdapterRequest, LoadAdapterResult
from server.vllm_api import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest

router = APIRouter()


class UnloadResult(BaseModel):
    name: str
    unloaded: bool
    purged: bool | None = None  # only with purge=true: whether the store held it (and no longer does)


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


# what an adapter folder may carry beside its weights (lofit-train writes them), readable with the inference key
EXTRA_FILES = {"heads.png": "image/png", "train_report.json": "application/json",
               "search.png": "image/png", "search_report.json": "application/json"}
EXTRA_FILE_BYTES = 16 << 20


@router.get("/adapters/{name}/files/{filename}", response_class=Response,
            responses={404: {"description": "not loaded, or no such file"}})
async def adapter_file(name: str, filename: str, request: Request) -> Response:
    """One of the files ``lofit-train`` writes beside an adapter (:data:`EXTRA_FILES`: the head map ``heads.png``,
    ``train_report.json``, and a search's ``search.png`` / ``search_report.json``), from the loaded adapter's
    folder on this node. 404 when the adapter is not loaded, the name is not one of those files, the adapter came
    without it (an upload carries only its weights), or it is not a regular file of at most 16 MiB in that folder
    (a symbolic link is never followed)."""
    record = request.app.state.lofit.registry.records.get(name)
    if record is None:
        raise HTTPException(404, f"adapter {name!r} is not loaded")
    if filename not in EXTRA_FILES:
        raise HTTPException(404, f"{filename!r} is not an adapter file; these are: {', '.join(EXTRA_FILES)}")
    try:
        if record.path is None:
            raise NotRegularFile(NotRegularFile.MISSING)
        content = await asyncio.to_thread(read_regular_file, record.path / filename, EXTRA_FILE_BYTES)
    except NotRegularFile:
        raise HTTPException(404, f"adapter {name!r} has no {filename}") from None
    return Response(content, media_type=EXTRA_FILES[filename])


async def _load(request: Request, name: str) -> LoadAdapterResult:
    """Load ``name``: its folder in the adapters directory, else (with a store) the store's copy."""
    state = request.app.state.lofit
    registry, loader = state.registry, state.store_loader
    if loader.store is not None and not registry.path_for(name).is_dir():
        return await _timed(state, _from_store(state, name))
    return await _timed(state, registry.load(name))


async def _from_store(state, name: str) -> tuple[Record, bool]:
    before = state.registry.records.get(name)
    sha = before.adapter.content_sha256 if before is not None else None
    record = await state.store_loader.refresh(name)
    return record, record.adapter.content_sha256 != sha


async def _timed(state, loading: Awaitable[tuple[Record, bool]]) -> LoadAdapterResult:
    start = now_ms()
    try:
        record, changed = await loading
    except (InvalidAdapter, UnknownAdapter):
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
    served model, written atomically (into the adapters directory with its permissions, or through to the
    store), then loaded."""
    state = request.app.state.lofit
    state.registry.path_for(name)  # refuse a bad name before reading anything
    limit = state.settings.max_upload_bytes
    files = {}
    for upload, filename in ((adapter_config, CONFIG_FILE), (adapter_tensors, TENSORS_FILE)):
        data = await upload.read(limit + 1)
        if len(data) > limit:
            raise InvalidAdapter(f"{filename} is larger than the upload limit ({limit} bytes)")
        files[filename] = data
    if state.store_loader.store is not None:
        return await _timed(state, state.store_loader.publish(name, files))
    await state.registry.install(name, files)
    return await _load(request, name)


@router.post("/adapters/{name}/reload", response_model=LoadAdapterResult,
             responses={400: {"description": "invalid adapter"}, 404: {"description": "not in the store"}})
async def reload_adapter(name: str, request: Request) -> LoadAdapterResult:
    """Read adapter ``name`` again now — from the store when the server has one (whatever the TTL), else from its
    folder — and load it if its content changed."""
    state = request.app.state.lofit
    state.registry.check_name(name)
    if state.store_loader.store is not None:
        return await _timed(state, _from_store(state, name))
    return await _timed(state, state.registry.load(name))


@router.delete("/adapters/{name}", response_model=UnloadResult, response_model_exclude_none=True,
               responses={400: {"description": "invalid adapter name"}})
async def unload_adapter(name: str, request: Request, purge: bool = False) -> UnloadResult:
    """Unload ``name`` (its folder stays on disk; with a store, a later request naming it loads it again).
    Requests already running finish with it. Idempotent. ``purge=true`` (store only) first removes its current
    content from the store, so no replica loads it again (others unload it at their next freshness check)."""
    state = request.app.state.lofit
    state.registry.check_reference(name)
    purged = None
    if purge:
        store = state.store_loader.store
        if store is None:
            raise InvalidAdapter("purge=true removes an adapter from the adapter store; this server has none "
                                 "(--adapter-store)")
        if "@" in name:
            raise InvalidAdapter("purge=true takes an adapter's name: a pinned reference's content is kept "
                                 "(unload it without purge)")
        purged = await asyncio.to_thread(store.delete, name)
    return UnloadResult(name=name, unloaded=await _unload(request, name), purged=purged)


@router.post("/v1/load_lora_adapter", response_class=PlainTextResponse,
             responses={400: {"description": "invalid adapter, or a path outside the adapters directory"}})
async def load_lora_adapter(body: LoadLoRAAdapterRequest, request: Request) -> PlainTextResponse:
    """vLLM's call: load adapter ``lora_name`` from its folder ``lora_path`` in the adapters directory."""
    state = request.app.state.lofit
    registry, store = state.registry, state.store_loader.store
    folder = registry.path_for(body.lora_name)
    given = Path(body.lora_path)
    target = given if given.is_absolute() else registry.directory / given
    in_store = store is not None and body.lora_path in (body.lora_name, store.where(body.lora_name))
    if not in_store and (given.name != body.lora_name or target.resolve() != folder):
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
