"""mailpipe's tag routes over the store (store/tags.py): list tags, set a message's tags, set
tags on many messages, rename a tag, delete a tag. Searching by tag is `q=tag:NAME` on
GET /api/v1/messages."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson
from aiohttp import web

from mailpipe.store.sqlite import SQLiteStore
from mailpipe.store.tags import TagError
from mailpipe.web.app import ApiError, json_response


class TagRoutes:
    def __init__(self, store: SQLiteStore) -> None:
        self.store = store

    def routes(self) -> list[web.RouteDef]:
        # {tag:.+}: a tag may hold a "/" (sent as %2F).
        return [
            web.get("/api/v1/tags", self.list_tags),
            web.put("/api/v1/tags", self.set_many),
            web.put("/api/v1/tags/{tag:.+}", self.rename),
            web.delete("/api/v1/tags/{tag:.+}", self.delete),
            web.put("/api/v1/messages/{uuid}/tags", self.set_one),
        ]

    async def list_tags(self, request: web.Request) -> web.Response:
        return json_response({"tags": await self.store.tags()})

    async def set_one(self, request: web.Request) -> web.Response:
        body = await _body(request, "tags", '{"tags": ["name", ...]}')
        uuid = request.match_info["uuid"]
        with _as_400():
            current = await self.store.set_tags([uuid], body["tags"])
        if uuid not in current:
            raise ApiError(404, "message not found")
        return json_response({"uuid": uuid, "tags": current[uuid]})

    async def set_many(self, request: web.Request) -> web.Response:
        body = await _body(request, "tags", '{"tags": ["name", ...], "ids": ["uuid", ...]}',
                           also="ids")
        with _as_400():
            current = await self.store.set_tags(body["ids"], body["tags"])
        missing = [uuid for uuid in dict.fromkeys(body["ids"]) if uuid not in current]
        return json_response({
            "messages": [{"uuid": uuid, "tags": tags} for uuid, tags in current.items()],
            "not_found": missing,
        })

    async def rename(self, request: web.Request) -> web.Response:
        body = await _body(request, "name", '{"name": "new name"}')
        with _as_400():
            updated = await self.store.rename_tag(request.match_info["tag"], body["name"])
        if not updated:
            raise ApiError(404, "no message has this tag")
        return json_response({"updated": updated})

    async def delete(self, request: web.Request) -> web.Response:
        with _as_400():
            updated = await self.store.delete_tag(request.match_info["tag"])
        if not updated:
            raise ApiError(404, "no message has this tag")
        return json_response({"updated": updated})


async def _body(request: web.Request, key: str, shape: str, *, also: str | None = None
                ) -> dict[str, Any]:
    """The JSON object body, holding `key` (and `also`), else a 400 showing `shape`."""
    error = ApiError(400, f"the body must be JSON: {shape}")
    try:
        body = await request.json(loads=orjson.loads)
    except ValueError:
        raise error from None
    if not isinstance(body, dict) or key not in body or (also is not None and also not in body):
        raise error
    return body


@contextmanager
def _as_400() -> Iterator[None]:
    """TagError (a bad tag name or id list) as a 400 saying what is wrong."""
    try:
        yield
    except TagError as exc:
        raise ApiError(400, str(exc)) from exc
