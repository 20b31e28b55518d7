"""The --trust-remote-code and --allow-pickle flags every command that loads a model takes (see medtune.core.safety).

Light at import, like the other cli_* modules: `medtune --help` must stay fast.
"""

from __future__ import annotations

from typing import Annotated

import typer

TrustRemoteCodeOpt = Annotated[bool, typer.Option(
    "--trust-remote-code", help="Let a model run the Python code it ships (auto_map in config.json / "
                                "tokenizer_config.json). Off: such models are refused. Only for models you trust.")]
AllowPickleOpt = Annotated[bool, typer.Option(
    "--allow-pickle", help="Accept pickle weights (*.bin, *.pt, *.pth, *.ckpt) when a folder has no safetensors: "
                           "read with torch.load(weights_only=True), converted to safetensors in the cache.")]


def untrusted(trust_remote_code: bool = False, allow_pickle: bool = False):
    """The policy context for a command's work: what the flags allow, nothing more."""
    from medtune.core.safety import policy

    return policy(trust_remote_code=bool(trust_remote_code), allow_pickle=bool(allow_pickle))
