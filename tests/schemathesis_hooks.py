"""schemathesis hooks for the API fuzz test: keep long polls short.

``follow=1`` streams until the client leaves and ``/wait`` may wait up to an
hour; both are real features, tested elsewhere, that would only make the fuzz
run wait.  Everything else in the generated queries is kept.
"""

from __future__ import annotations

from typing import Any

import schemathesis


@schemathesis.hook
def map_query(ctx: Any, query: dict[str, Any] | None) -> dict[str, Any] | None:
    if query is None:
        return query
    if str(query.get("follow", "")).lower() in {"1", "true"}:
        query["follow"] = "0"
    if "timeout_s" in query or "pattern" in query:
        query["timeout_s"] = 0
    return query
