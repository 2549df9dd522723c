"""The webui runs this at every start: it must be fast, idempotent, and install nothing the webui has.

Merge Lab needs torch (the webui's own, never installed here), safetensors, which the webui pins too
(0.4.2 in v1.10.1), and regex (for discard_weights' time limit), which the webui has through
transformers. So this installs either only when it is missing or older than its minimum, which a
stock webui never is; it reads package metadata and imports nothing heavy.
"""

from importlib import metadata

# package -> the oldest version that works (regex added search timeouts in 2019.3.12).
MINIMUMS = {"safetensors": (0, 4), "regex": (2019, 3, 12)}


def installed_version(package: str) -> tuple[int, ...] | None:
    try:
        version = metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
    numbers = []
    for part in version.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        numbers.append(int(digits or 0))
    return tuple(numbers)


def main() -> None:
    wanted = []
    for package, minimum in MINIMUMS.items():
        version = installed_version(package)
        if version is None or version < minimum:
            wanted.append(f"{package}>={'.'.join(map(str, minimum))}")
    if not wanted:
        return
    import launch  # the webui's installer helpers; only imported when there is something to do

    launch.run_pip("install " + " ".join(f'"{spec}"' for spec in wanted), f"{', '.join(wanted)} for Merge Lab")


if __name__ == "__main__":
    main()
