"""A client of the GraphQL API as the gateway calls it (the caller's identity in x-user-id and x-user-scopes), and
the API served in the test's own process."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from tessera_graphql.app import GraphQLSettings, build_app

CUSTOMER = "user:read user:write order:read order:write inventory:read"


class GraphQL:
    def __init__(self, url: str, session: aiohttp.ClientSession) -> None:
        self.url = url
        self.session = session

    async def post(self, query: str, variables: dict | None = None, *, subject: str | None,
                   scopes: str = CUSTOMER, headers: dict[str, str] | None = None) -> tuple[int, dict, CIMultiDict]:
        sent = dict(headers or {})
        if subject is not None:
            sent |= {"x-user-id": subject, "x-user-scopes": scopes}
        async with self.session.post(self.url, json={"query": query, "variables": variables or {}},
                                     headers=sent) as response:
            return response.status, await response.json(), CIMultiDict(response.headers)


@contextlib.asynccontextmanager
async def serving(settings: GraphQLSettings) -> AsyncIterator[GraphQL]:
    """The GraphQL API with `settings` on 127.0.0.1 (a free port) in this process, and a client of it; stopped on
    leaving."""
    runner = web.AppRunner(build_app(settings))
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        async with aiohttp.ClientSession() as session:
            yield GraphQL(f"http://127.0.0.1:{runner.addresses[0][1]}/graphql", session)
    finally:
        await runner.cleanup()
