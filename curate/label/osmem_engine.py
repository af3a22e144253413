"""Argilla search engine for the osmem OpenSearch emulator (runs inside the server's own venv).

Argilla's stock `opensearch` engine works against osmem except where it updates a document with a
painless script (adding/removing a response, removing a suggestion): osmem answers those with HTTP 500.
This subclass keeps Argilla's query building and HTTP client and performs exactly those three
updates as read-modify-write of the document's `_source` with a plain partial `doc` update.

It registers under the engine name `osmem-opensearch`; importing this module before
`argilla_server:app` is served (see `server_main.py`) is all it takes, no patching of argilla-server.
The read-modify-write is serialized per process with a lock; one uvicorn worker serves a small team.

Not for production: use Argilla's supported Elasticsearch or OpenSearch there.
"""

from __future__ import annotations

import asyncio
import dataclasses

from argilla_server.models import Response, Suggestion
from argilla_server.search_engine.base import SearchEngine
from argilla_server.search_engine.commons import es_index_name_for_dataset
from argilla_server.search_engine.opensearch import OpenSearchEngine

ENGINE_NAME = "osmem-opensearch"

_update_lock = asyncio.Lock()


@SearchEngine.register(engine_name=ENGINE_NAME)
@dataclasses.dataclass
class OsmemOpenSearchEngine(OpenSearchEngine):
    async def _get_source(self, index_name: str, id: str) -> dict:
        document = await self.client.get(index=index_name, id=id)
        return document.get("_source") or {}

    async def update_record_response(self, response: Response) -> None:
        record = response.record
        index_name = es_index_name_for_dataset(record.dataset)
        es_response = self._map_record_response_to_es(response)
        async with _update_lock:
            source = await self._get_source(index_name, str(record.id))
            response_id = str(es_response["id"])
            responses = [item for item in (source.get("responses") or []) if str(item.get("id")) != response_id]
            responses.append(es_response)
            await self._update_document_request(index_name, id=str(record.id), body={"doc": {"responses": responses}})

    async def delete_record_response(self, response: Response) -> None:
        record = response.record
        index_name = es_index_name_for_dataset(record.dataset)
        response_id = str(response.id)
        async with _update_lock:
            source = await self._get_source(index_name, str(record.id))
            responses = [item for item in (source.get("responses") or []) if str(item.get("id")) != response_id]
            await self._update_document_request(index_name, id=str(record.id), body={"doc": {"responses": responses}})

    async def delete_record_suggestion(self, suggestion: Suggestion) -> None:
        index_name = es_index_name_for_dataset(suggestion.record.dataset)
        async with _update_lock:
            source = await self._get_source(index_name, str(suggestion.record_id))
            suggestions = dict(source.get("suggestions") or {})
            suggestions.pop(suggestion.question.name, None)
            # A partial update merges objects, so the whole `_source` is written back without the key.
            source["suggestions"] = suggestions
            await self.client.index(index=index_name, id=str(suggestion.record_id), body=source, refresh=True)
