"""User-facing errors: one line that says what and where, one line of hint, an exit code.

Exit codes: 2 bad input, 3 missing optional dependency, 4 resources (memory, disk),
1 anything we did not foresee (shown with a traceback under --debug).
"""

from __future__ import annotations


class MedtuneError(Exception):
    exit_code = 1

    def __init__(self, message: str, hint: str = "", *, where: str | None = None):
        self.message = message
        self.hint = hint
        self.where = where
        super().__init__(self.line())

    def line(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


class BadInput(MedtuneError):
    """The user's file, option or spec is wrong."""

    exit_code = 2


class MissingDependency(MedtuneError):
    """An optional package or tool is not installed."""

    exit_code = 3


class ResourceError(MedtuneError):
    """Not enough memory or disk, or a resource is busy."""

    exit_code = 4


def require(module: str, extra: str | None = None, purpose: str = ""):
    """Import an optional module or raise MissingDependency with the install line."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        pkg = module.split(".")[0].replace("_", "-")
        target = f'"medtune[{extra}]"' if extra else pkg
        what = f" ({purpose})" if purpose else ""
        raise MissingDependency(
            f"{module} is not installed{what}: {exc}",
            hint=f"pip install {target}",
        ) from exc
