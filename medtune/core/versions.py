"""The installed versions of packages, as stage manifests, run fingerprints and `medtune doctor` record them."""

from __future__ import annotations


def installed_version(dist: str) -> str | None:
    """The installed version of a distribution (pip's name), None when it is not installed."""
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def versions(packages=(), *, missing: bool = False, own: bool = True) -> dict:
    """{distribution: version} for `packages`, in their order, after medtune's own (own=False leaves it out).
    missing=False leaves out what is not installed (so installing it later changes nothing recorded);
    missing=True lists it as None."""
    from medtune import __version__

    found = {"medtune": __version__} if own else {}
    for pkg in packages:
        v = installed_version(pkg)
        if v is not None or missing:
            found[pkg] = v
    return found
