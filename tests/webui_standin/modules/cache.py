"""modules/cache.py: named sections of the webui's cache.json, dumped on request."""

caches: dict[str, dict] = {}
dumps = 0


def cache(subsection: str) -> dict:
    return caches.setdefault(subsection, {})


def dump_cache():
    global dumps
    dumps += 1
