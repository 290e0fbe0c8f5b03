"""The catalogue of deltas and variants: registering, verifying, defining them.

Engines are not touched here (server/gateway.py owns them and calls this): an artifact is verified
before it is registered, and a variant is checked against its base's checkpoint and its deltas'
artifacts before it is defined.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from deltas import DeltaError, IncompatibleError, open_artifact
from deltas.checkpoint import vocabulary_digest
from deltas.lora import adapter_rank
from deltas.store import ArtifactStore, file_identity, is_uri, materialize
from loaders.merge import check_recipe
from server.adapters import AdapterLane
from server.bases import vocabulary_problem
from server.errors import BadRequestError, ConflictError, GatewayError
from server.registry import DeltaRecord, Registry, VariantRecord, VariantTerm, check_name
from server.settings import GatewaySettings, StartupVariant
from server.uploads import receive_to_file

log = logging.getLogger("deltagate")


class Catalog:
    """Deltas and variants in the registry, each verified before it is recorded."""

    def __init__(self, registry: Registry, settings: GatewaySettings, adapters: AdapterLane):
        self.registry, self.settings, self.adapters = registry, settings, adapters
        self.store = ArtifactStore(settings.artifact_store) if settings.artifact_store else None

    async def register_delta_path(self, name: str, path: str) -> DeltaRecord:
        """Register an artifact already on disk, after verifying it fully."""
        require_name(name)
        if name in self.registry.state.deltas:
            raise ConflictError(f"delta {name!r} exists; delete it first")
        if is_uri(path):  # already in a store: this node's verified copy is described
            local = await asyncio.to_thread(materialize, path)
            record = await asyncio.to_thread(_describe_delta, name, local, False)
            record = record.model_copy(update={"path": path, "mtime_ns": 0})
        else:
            resolved = Path(path).expanduser().resolve()
            record = await asyncio.to_thread(_describe_delta, name, resolved, False)
            record = await self._to_store(record, resolved)
        self.registry.add_delta(record)
        return record

    async def _to_store(self, record: DeltaRecord, local: Path) -> DeltaRecord:
        """With an artifact store: `record` once its file is complete in the store (every node reads it
        there); without one, `record` as it is."""
        if self.store is None:
            return record
        stored = await asyncio.to_thread(self.store.put, local)
        size, mtime = (stored.size, 0) if is_uri(stored.uri) else file_identity(stored.uri)[:2]
        moved = {
            "path": stored.uri,
            "size_bytes": size,
            "mtime_ns": mtime,
            "source": str(local),
            "source_mtime_ns": record.mtime_ns,
        }
        return record.model_copy(update=moved)

    async def register_delta_upload(self, name: str, chunks: AsyncIterator[bytes]) -> DeltaRecord:
        """Store an uploaded artifact in the store dir (atomically), verify, register."""
        require_name(name)
        if name in self.registry.state.deltas:
            raise ConflictError(f"delta {name!r} exists; delete it first")
        store = self.settings.store_dir
        store.mkdir(parents=True, exist_ok=True)
        final = store / f"{name.replace('/', '__')}.safetensors"
        tmp = store / f".upload-{uuid.uuid4().hex}.partial"
        try:
            await receive_to_file(
                chunks, tmp, self.settings.max_upload_bytes, self.settings.upload_idle_seconds
            )
            try:
                record = await asyncio.to_thread(_describe_delta, name, tmp, True)
            except DeltaError as exc:  # its message names the temporary file: name the upload instead
                raise type(exc)(str(exc).replace(str(tmp), f"uploaded artifact {name!r}")) from None
            if self.store is not None:  # registered only once its file is complete in the store
                record = await self._to_store(record, tmp)
            else:  # only a verified artifact ever lands in the state dir (a planted symlink is replaced)
                os.replace(tmp, final)
                record = record.model_copy(update={"path": str(final)})
        finally:
            tmp.unlink(missing_ok=True)
        record = record.model_copy(update={"source": None, "source_mtime_ns": None})  # the upload's tmp file
        self.registry.add_delta(record)
        return record

    def delete_delta(self, name: str) -> None:
        """Unregister a delta; an uploaded file goes too (from the store once no other delta names it)."""
        record = self.registry.remove_delta(name)
        if not record.uploaded or any(d.path == record.path for d in self.registry.state.deltas.values()):
            return
        digest = self.store.digest_of(record.path) if self.store is not None else None
        if digest is not None:
            self.store.delete(digest)
        elif not is_uri(record.path):
            Path(record.path).unlink(missing_ok=True)

    async def define_variant(self, record: VariantRecord) -> VariantRecord:
        """Validate that the deltas fit the base, then register the variant."""
        self.registry.base(record.base)  # an unknown base or delta is a 404 before anything else
        for term in record.deltas:
            self.registry.delta(term.delta)  # (pulled from the database if another gateway added it)
        self.registry.state.require_free(record.name)  # before the checks; again in the registry's swap
        try:
            await asyncio.to_thread(check_recipe, self.registry.state.recipe(record))
        except IncompatibleError as exc:  # name the deltas as the client did, not by their files
            message = str(exc)
            for term in record.deltas:
                message = message.replace(self.registry.delta(term.delta).path, repr(term.delta))
            raise IncompatibleError(message) from None
        base = self.registry.base(record.base)
        for term in record.deltas if not record.allow_vocab_mismatch else ():
            problem = vocabulary_problem(self.registry.delta(term.delta), base)
            if problem:
                raise BadRequestError(f"variant {record.name!r}: {problem}")
        if record.lane == "adapter":
            unfit = self.adapters.unfit(record, base, self.registry.state.deltas_of(record))
            if unfit:
                raise BadRequestError(f"variant {record.name!r} cannot be served as an adapter: {unfit}")
        self.registry.add_variant(record)
        return record

    async def delete_variant(self, name: str) -> None:
        """Forget a variant; an adapter it was served as is unloaded and its files deleted."""
        state = self.registry.snapshot(name)
        variant, adapter = state.variants.get(name), None
        try:
            if variant is not None:
                base = state.bases[variant.base]
                adapter = self.adapters.serving(
                    variant, base, state.recipe(variant), state.deltas_of(variant)
                )
        except GatewayError:  # a delta gone: no adapter of it can be loaded
            adapter = None
        self.registry.remove_variant(name)  # 404, or 409 while an alias routes to it
        if adapter is not None:
            await self.adapters.unload(adapter)

    async def ensure_variant(self, spec: StartupVariant) -> VariantRecord:
        """Define a command-line variant, registering artifact paths as deltas on the way."""
        terms = []
        for term in spec.terms:
            ref = await self._delta_for_ref(term.ref)
            terms.append(VariantTerm(delta=ref, alpha=term.alpha, density=term.density))
        record = VariantRecord(
            name=spec.name,
            base=spec.base or next(iter(self.registry.state.bases)),
            deltas=terms,
            method=spec.method,
            normalize=spec.normalize,
            seed=spec.seed,
        )
        existing = self.registry.state.variants.get(spec.name)
        if existing is not None:
            if existing == record:
                return existing
            self.registry.remove_variant(spec.name)  # the command line wins
        return await self.define_variant(record)

    async def _delta_for_ref(self, ref: str) -> str:
        if ref in self.registry.state.deltas:
            return ref
        if is_uri(ref):  # a stored artifact: registered once, under a name from its hash
            same = [r.name for r in self.registry.state.deltas.values() if r.path == ref]
            if same:
                return same[0]
            return (await self.register_delta_path(f"stored-{Path(ref).stem[:12]}", ref)).name
        path = Path(ref).expanduser().resolve()
        for record in self.registry.state.deltas.values():
            if Path(record.source or record.path) == path:
                mtime = record.mtime_ns if record.source is None else record.source_mtime_ns
                if file_identity(path)[:2] != (record.size_bytes, mtime):
                    self.registry.remove_delta(record.name)  # re-extracted since: re-verify
                    break
                return record.name
        name = path.stem
        while name in self.registry.state.deltas:
            name += "-1"
        return (await self.register_delta_path(name, str(path))).name


def drop_partial_uploads(store: Path) -> None:
    """Uploads a killed gateway left half-written: never registered, so never served; removed."""
    for partial in store.glob(".upload-*.partial") if store.is_dir() else ():
        log.warning("removing %s, an upload interrupted by a previous stop", partial.name)
        partial.unlink(missing_ok=True)


def require_name(name: str) -> None:
    """400 unless `name` is a valid model/delta name."""
    try:
        check_name(name)
    except ValueError as exc:
        raise BadRequestError(f"invalid name {name!r}: {exc}") from None


def eos_ids(generation_config: dict) -> list[int]:
    """The end-of-sequence token ids a generation_config.json names."""
    eos = generation_config.get("eos_token_id")
    return [eos] if isinstance(eos, int) else [e for e in (eos or []) if isinstance(e, int)]


def _describe_delta(name: str, path: Path, uploaded: bool) -> DeltaRecord:
    artifact = open_artifact(path, verify=True)
    m = artifact.manifest
    size, mtime = file_identity(path)[:2]
    try:
        rank, unfit = adapter_rank(m), None
    except DeltaError as exc:
        rank, unfit = None, str(exc)
    return DeltaRecord(
        name=name,
        path=str(path),
        size_bytes=size,
        mtime_ns=mtime,
        base_architecture=m.base.architecture,
        base_content_hash=m.base.content_hash,
        tensors=len(m.tensors),
        encodings=sorted({t.encoding for t in m.tensors}),
        lossless=m.lossless,
        chat_template=m.chat_template,
        eos_token_ids=eos_ids(m.generation_config),
        uploaded=uploaded,
        adapter_rank=rank,
        adapter_unfit=unfit,
        vocab_digest=vocabulary_digest(artifact.side_files()),
    )
