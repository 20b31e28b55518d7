"""One options dataclass per stage is the source of its CLI flags, its library keywords and its `medtune run` config
section (medtune.core.options): the flags and their defaults are the dataclass's, a config section takes exactly
its fields (and their old spellings), and the default config only uses known keys."""

import dataclasses

import pytest
import typer

from medtune.cli.app import app
from medtune.core import options
from medtune.core.errors import BadInput
from medtune.data.options import PrepareOptions
from medtune.eval.options import EvalOptions
from medtune.export.options import ExportOptions
from medtune.fuse.options import FuseOptions
from medtune.pipeline import DEFAULT_CONFIG_TEXT, load_config
from medtune.train.options import TrainOptions

STAGES = [
    (("prepare",), PrepareOptions),
    (("train",), TrainOptions),
    (("fuse",), FuseOptions),
    (("export",), ExportOptions),
    (("eval", "run"), EvalOptions),
]


def _command(path):
    cmd = typer.main.get_command(app)
    for name in path:
        cmd = cmd.commands[name]
    return cmd


@pytest.mark.parametrize("path,cls", STAGES, ids=[" ".join(p) for p, _ in STAGES])
def test_cli_flags_and_defaults_are_the_dataclass_fields(path, cls):
    params = {p.name: p for p in _command(path).params}
    for f in options.fields(cls):
        if not f.metadata.get("cli", True):
            continue
        assert f.name in params, f"{' '.join(path)} has no flag for {cls.__name__}.{f.name}"
        default = options.default_of(f)
        cli_default = params[f.name].default
        assert (list(cli_default) if isinstance(default, list) else cli_default) == default, f.name
        flags = f.metadata.get("flags") or (f"--{f.name.replace('_', '-')}",)
        assert flags[0].split("/")[0] in params[f.name].opts, (f.name, params[f.name].opts)
        assert params[f.name].help == f.metadata["help"]


def test_train_flag_reaches_the_options_under_the_field_name(tmp_path):
    """--eval-every is TrainOptions.eval_every (once three names: eval_every, steps_per_eval, --eval-every)."""
    assert "eval_every" in {f.name for f in options.fields(TrainOptions)}
    assert options.from_kwargs(TrainOptions, steps_per_eval=7).eval_every == 7  # the old keyword still works
    assert TrainOptions(target_modules="q_proj, v_proj").target_modules == ["q_proj", "v_proj"]


def test_unknown_option_names_the_closest_field():
    with pytest.raises(BadInput) as exc:
        options.from_kwargs(PrepareOptions, max_seq_lenght=10)
    assert "max_seq_length" in exc.value.hint


def test_run_config_sections_take_the_dataclass_fields_and_old_spellings():
    cfg = load_config(
        {
            "prepare": {"format": "alpaca", "map": "question=Q"},
            "train": {"steps_per_eval": 3},
            "export": {"quants": "q8_0"},
            "eval": {"fidelity-tokens": 8},
        }
    )
    assert cfg["prepare"]["fmt"] == "alpaca" and cfg["prepare"]["mapping"] == "question=Q"
    assert cfg["train"]["eval_every"] == 3
    assert cfg["export"]["quant"] == ["q8_0"]
    assert cfg["eval"]["fidelity_tokens"] == 8
    with pytest.raises(BadInput) as exc:  # a command-line-only flag is not a config key
        load_config({"fuse": {"force": True}})
    assert "'force'" in str(exc.value) and "'fuse'" in str(exc.value)
    with pytest.raises(BadInput) as exc:
        load_config({"eval": {"max_token": 8}})
    assert "max_tokens" in exc.value.hint


def test_every_key_of_the_default_config_is_a_known_option():
    import yaml

    load_config(yaml.safe_load(DEFAULT_CONFIG_TEXT))  # raises on an unknown key
    sections = {
        "prepare": PrepareOptions,
        "train": TrainOptions,
        "fuse": FuseOptions,
        "export": ExportOptions,
        "eval": EvalOptions,
    }
    given = yaml.safe_load(DEFAULT_CONFIG_TEXT)
    for name, cls in sections.items():
        fields = {f.name for f in dataclasses.fields(cls)}
        extra = set(given[name]) - fields - {"dataset", "backend", "enabled", "base", "gguf"}
        assert not extra, (name, extra)


@pytest.mark.parametrize("command", [("generate", "--prompt", "hi"), ("eval",), ("eval", "run")])
def test_model_is_an_argument_or_model_flag_everywhere(tmp_path, command):
    """chat, generate and eval take MODEL positionally (as before) and as --model/-m, like prepare, train and fuse."""
    from conftest import run_cli

    missing = tmp_path / "no-such-model"
    flag = run_cli(*command, "--model", missing, *(["--data", tmp_path] if command[0] == "eval" else []))
    assert flag.returncode == 2
    assert str(missing) in flag.stdout + flag.stderr  # the model reached the command
    both = run_cli(
        *command[:2] if command[0] == "eval" else command[:1],
        "a",
        "--model",
        "b",
        *command[1:] if command[0] == "generate" else [],
    )
    assert both.returncode == 2 and "two models given" in both.stderr
