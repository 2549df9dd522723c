"""The webui runs this at every start: it must be fast, idempotent, and install nothing the webui has.

Merge Lab needs only torch (the webui's own, never installed here) and safetensors, which the webui
pins too (0.4.2 in v1.10.1). So this installs safetensors only when it is missing or older than
MINIMUM, which a stock webui never is; it reads package metadata and imports nothing heavy.
"""

from importlib import metadata

MINIMUM = (0, 4)


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
    version = installed_version("safetensors")
    if version is not None and version >= MINIMUM:
        return
    import launch  # the webui's installer helpers; only imported when there is something to do

    wanted = ".".join(map(str, MINIMUM))
    launch.run_pip(f'install "safetensors>={wanted}"', f"safetensors>={wanted} for Merge Lab")


if __name__ == "__main__":
    main()
