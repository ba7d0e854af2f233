"""Adapters over HTTP: list and show (inference key), load, upload and unload (admin key)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from fastapi import APIRouter, Depends, HTTPException, Request, UploadFile
from pydantic import BaseModel

from lofit.adapter import CONFIG_FILE, TENSORS_FILE
from server.auth import require_admin_key, require_inference_key
from server.registry import InvalidAdapter, now_ms
from server.schemas import AdapterInfo, AdapterList, LoadAdapterRequest, LoadAdapterResult

router = APIRouter(prefix="/adapters")


class UnloadResult(BaseModel):
    name: str
    unloaded: bool


@router.get("", response_model=AdapterList, dependencies=[Depends(require_inference_key)])
async def list_adapters(request: Request) -> AdapterList:
    state = request.app.state.lofit
    return AdapterList(adapters=[r.info() for _, r in sorted(state.registry.records.items())],
                       skipped=dict(state.skipped_adapters))


@router.get("/{name}", response_model=AdapterInfo, dependencies=[Depends(require_inference_key)],
            responses={404: {"description": "not loaded"}})
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


@router.post("", response_model=LoadAdapterResult, dependencies=[Depends(require_admin_key)],
             responses={400: {"description": "invalid adapter"}})
async def load_adapter_by_name(body: LoadAdapterRequest, request: Request) -> LoadAdapterResult:
    """Load (or reload, if its content changed) the adapter in folder ``name`` of the adapters directory."""
    return await _load(request, body.name)


@router.put("/{name}", response_model=LoadAdapterResult, dependencies=[Depends(require_admin_key)],
            responses={400: {"description": "invalid adapter"}})
async def upload_adapter(name: str, request: Request, adapter_config: UploadFile,
                         adapter_tensors: UploadFile) -> LoadAdapterResult:
    """Upload ``adapter_config.json`` and ``adapter.safetensors`` as adapter ``name``: validated against the
    served model, written atomically into the adapters directory, then loaded."""
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


@router.delete("/{name}", response_model=UnloadResult, dependencies=[Depends(require_admin_key)],
               responses={400: {"description": "invalid adapter name"}})
async def unload_adapter(name: str, request: Request) -> UnloadResult:
    """Unload ``name`` (its folder stays on disk). Requests already running finish with it. Idempotent."""
    state = request.app.state.lofit
    unloaded = await state.registry.unload(name)
    state.metrics.adapter_loads.labels("unload", "ok" if unloaded else "noop").inc()
    state.metrics.adapters_loaded.set(len(state.registry.records))
    return UnloadResult(name=name, unloaded=unloaded)

