"""What the command areas share: the option aliases (model, --json, --trust-remote-code, --allow-pickle), the one
JSON output sink (always redacted), and the policy context the untrusted-file flags open (see medtune.core.safety).

Light at import, like every module in medtune.cli: `medtune --help` must stay fast.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer

DEFAULT_MODEL = "builtin:smollm2-135m"
MODEL_HELP = "Folder, .gguf file, builtin:NAME, ORG/NAME (Hub) or modelscope:ORG/NAME."

ModelOpt = Annotated[str, typer.Option("--model", "-m", help=MODEL_HELP)]
ModelArg = Annotated[Optional[str], typer.Argument(metavar="MODEL", help=MODEL_HELP)]
# the commands whose MODEL is positional also take it as --model/-m, as prepare, train and fuse do
ModelFlag = Annotated[
    Optional[str], typer.Option("--model", "-m", metavar="MODEL", help="The same as the MODEL argument.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
TrustRemoteCodeOpt = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code",
        help="Let a model run the Python code it ships (auto_map in config.json / "
        "tokenizer_config.json). Off: such models are refused. Only for models you trust.",
    ),
]
AllowPickleOpt = Annotated[
    bool,
    typer.Option(
        "--allow-pickle",
        help="Accept pickle weights (*.bin, *.pt, *.pth, *.ckpt) when a folder has no safetensors: "
        "read with torch.load(weights_only=True), converted to safetensors in the cache.",
    ),
]


def emit_json(obj) -> None:
    """The one way a command prints --json: redacted (tokens, credentials in URLs), UTF-8 kept, paths as strings."""
    from medtune.core.redact import redact

    sys.stdout.write(json.dumps(redact(obj), indent=2, ensure_ascii=False, default=str) + "\n")


def pick_model(positional: Optional[str], flag: Optional[str], default: Optional[str] = None) -> str:
    """MODEL given as an argument or as --model (not both, unless they agree)."""
    from medtune.core.errors import BadInput

    if positional and flag and positional != flag:
        raise BadInput(f"two models given: {positional!r} and --model {flag!r}", hint="give MODEL once")
    model = positional or flag or default
    if not model:
        raise BadInput("no model given", hint="pass MODEL (a folder, .gguf file, builtin:NAME or ORG/NAME)")
    return model


def untrusted(trust_remote_code: bool = False, allow_pickle: bool = False):
    """The policy context for a command's work: what the flags allow, nothing more."""
    from medtune.core.safety import policy

    return policy(trust_remote_code=bool(trust_remote_code), allow_pickle=bool(allow_pickle))


def _cli_annotation(f, hint):
    """Annotated[type, typer.Option(...)] for one field of an options dataclass (medtune.core.options.option)."""
    import types
    import typing

    typ = f.metadata.get("cli_type") or hint
    if isinstance(typ, types.UnionType) or typing.get_origin(typ) is typing.Union:
        rest = [a for a in typing.get_args(typ) if a is not type(None)]
        typ = Optional[rest[0]] if len(rest) == 1 else typ
    flags = f.metadata.get("flags") or (f"--{f.name.replace('_', '-')}",)
    return Annotated[typ, typer.Option(*flags, help=f.metadata.get("help", ""), metavar=f.metadata.get("metavar"))]


COMMON = ("as_json", "trust_remote_code", "allow_pickle")


def stage_options(cls, exclude: tuple[str, ...] = (), build: bool = True):
    """Decorate a command whose parameter `opts` is a stage's options dataclass: the command then takes one flag per
    field (names, types, defaults and help from the dataclass) and receives them built into `opts`. The command's own
    parameters (arguments, --json, ...) stay as they are; `exclude` names fields the command does not expose. build=False:
    the command has no `opts` and gets the fields as keyword arguments (train merges a YAML file in first)."""
    import functools
    import inspect

    from medtune.core import options

    hints = options.field_types(cls)
    chosen = [f for f in options.fields(cls) if f.metadata.get("cli", True) and f.name not in exclude]

    def wrap(command):
        sig = inspect.signature(command, eval_str=True)
        own = [p for name, p in sig.parameters.items() if name != "opts" and p.kind is not p.VAR_KEYWORD]
        added = [
            inspect.Parameter(
                f.name,
                inspect.Parameter.KEYWORD_ONLY,
                default=options.default_of(f),
                annotation=_cli_annotation(f, hints[f.name]),
            )
            for f in chosen
        ]
        names = {f.name for f in chosen}

        @functools.wraps(command)
        def run(**kwargs):
            if not build:
                return command(**kwargs)
            given = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
            return command(opts=cls(**given), **kwargs)

        kinds = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
        # --help lists: the arguments and the command's own options, the stage's options, then the common ones
        common = [p for p in kinds if p.name in COMMON]
        first = [p for p in kinds if p.name not in COMMON]
        run.__signature__ = sig.replace(parameters=[*first, *added, *common])
        run.__annotations__ = {}
        del run.__wrapped__  # typer must read the signature above, not the command's
        return run

    return wrap
