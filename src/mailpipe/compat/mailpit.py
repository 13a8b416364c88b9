"""PLACEHOLDER (compat base): replaced by the mailpit-compatible API."""

from aiohttp import web


def create_app(context):
    async def info(request):
        return web.json_response({"api": "mailpit", "count": await context.store.count()})
    app = web.Application()
    app.router.add_get("/api/v1/info", info)
    return app
