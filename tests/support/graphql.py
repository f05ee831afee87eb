"""A client of the GraphQL API as the gateway calls it: the caller's identity in x-user-id and x-user-scopes."""

from __future__ import annotations

import aiohttp
from multidict import CIMultiDict

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
