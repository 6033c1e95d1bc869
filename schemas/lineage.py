"""Where results come from: a stable identity of the API that produced them.

The identity is the base URL without its scheme, default port and API version (`api.openai.com`,
`myres.openai.azure.com/openai`, `127.0.0.1:8089`), or a name given on purpose
(`NIGHTBATCH_API_IDENTITY`; the bundled emulator under `--emulator` is `emulator`). The result cache is
scoped by it and every output row carries it (`nb_api`): a run against one API is never served
results another produced, so a free dry run on the emulator never reaches the real table."""

from __future__ import annotations

from urllib.parse import urlsplit

OPENAI = "api.openai.com"
DEFAULT_PORTS = {"http": 80, "https": 443}


def api_identity(base_url: str | None) -> str:
    if not base_url:
        return OPENAI
    parts = urlsplit(base_url.strip() if "://" in base_url else f"https://{base_url.strip()}")
    host = (parts.hostname or "").lower()
    port = f":{parts.port}" if parts.port and parts.port != DEFAULT_PORTS.get(parts.scheme) else ""
    path = parts.path.rstrip("/")
    path = path.removesuffix("/v1")
    return f"{host}{port}{path}"


def slug(identity: str) -> str:
    """The identity as a path segment."""
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in identity)
