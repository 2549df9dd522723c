"""modules/hashes.py: sha256 with the cache keyed by title and checked against the file's mtime."""

import hashlib
import os

from modules import cache as _cache
from modules import shared

cache = _cache.cache
dump_cache = _cache.dump_cache
calculated: list[str] = []  # files the stand-in had to read in full


def calculate_sha256(filename):
    calculated.append(os.path.abspath(filename))
    digest = hashlib.sha256()
    with open(filename, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_from_cache(filename, title):
    hashes = cache("hashes")
    try:
        ondisk_mtime = os.path.getmtime(filename)
    except FileNotFoundError:
        return None
    if title not in hashes:
        return None
    cached = hashes[title].get("sha256")
    if ondisk_mtime > hashes[title].get("mtime", 0) or cached is None:
        return None
    return cached


def sha256(filename, title):
    value = sha256_from_cache(filename, title)
    if value is not None:
        return value
    if shared.cmd_opts.no_hashing:
        return None
    value = calculate_sha256(filename)
    cache("hashes")[title] = {"mtime": os.path.getmtime(filename), "sha256": value}
    dump_cache()
    return value
