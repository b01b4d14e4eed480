"""Each setting has one source: the flags, the config-file keys and the experiments' flags take
their defaults from the dataclasses (jaxvae.cli.flags)."""

import argparse
import contextlib
import dataclasses
import io
import sys
from pathlib import Path

import pytest
from jsonargparse import ArgumentParser

from jaxvae.base.errors import ConfigError
from jaxvae.cli import app as cli_main
from jaxvae.cli.flags import add_flags, field_defaults
from jaxvae.core.augment import AugmentConfig
from jaxvae.inference.settings import EvalSettings
from jaxvae.training.config import CLI_SCHEDULE, TrainConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the experiments/ scripts


def _verb(name):
    return cli_main.parser()._subcommands_action._name_parser_map[name]


def _defaults(parser) -> dict:
    return {a.dest: a.default for a in parser._actions}


def test_train_flags_default_to_the_dataclass_and_the_cli_schedule():
    got = _defaults(_verb("train"))
    want = field_defaults(TrainConfig, CLI_SCHEDULE)
    for name in cli_main.TRAIN_FLAGS:
        assert got[name] == want[name], name
    for f in dataclasses.fields(AugmentConfig):
        assert got[f"augmentation.{f.name}"] == getattr(AugmentConfig(), f.name)


@pytest.mark.parametrize("verb,names", [("score", cli_main.MAP_FLAGS),
                                        ("evaluate", cli_main.MAP_FLAGS
                                         + cli_main.SCORING_FLAGS)])
def test_eval_flags_default_to_eval_settings(verb, names):
    got = _defaults(_verb(verb))
    for name in names:
        want = getattr(EvalSettings(), name)
        assert (got[name].split(",") if name == "predictors" else got[name]) == (
            list(want) if name == "predictors" else want), name
    # the flags' defaults make the default settings (the predictors sorted, as ever)
    args = _verb(verb).parse_args(["--run", "r", "--out", "o", "--input", "i"]
                                  if verb == "score" else ["--run", "r", "--out", "o"])
    built = EvalSettings(**{n: args[n] for n in names})
    assert dataclasses.replace(built, predictors=EvalSettings().predictors) == \
        dataclasses.replace(EvalSettings(), **{n: args[n] for n in names if n != "predictors"})
    assert sorted(built.predictors) == sorted(EvalSettings().predictors)


def test_a_changed_dataclass_default_changes_help_parsing_and_config_files(tmp_path):
    """The generator reads the default from the class: change it there and the flag, its
    --help and a config file without the key all follow."""
    changed = dataclasses.make_dataclass(
        "TrainConfig", [("latent_dim", int, dataclasses.field(default=17))])
    p = ArgumentParser(exit_on_error=False, env_prefix=False)
    p.add_argument("--config", action="config")
    add_flags(p, changed, ("latent_dim",), help={"latent_dim": "latent size"})
    assert p.parse_args([]).latent_dim == 17
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    assert p.parse_args(["--config", str(cfg)]).latent_dim == 17
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        p.parse_args(["--help"])
    assert "default: 17" in out.getvalue()


def test_the_experiments_take_the_same_defaults():
    from experiments import common, cross_dataset

    want = {**field_defaults(TrainConfig, CLI_SCHEDULE), **field_defaults(EvalSettings)}
    for ap in (common.parser("x"), cross_dataset.parser()):
        assert isinstance(ap, argparse.ArgumentParser)
        got = _defaults(ap)
        for name in ("lr", "batch_size", "max_steps", "patience", "proj_steps"):
            assert got[name] == want[name], name


def test_an_unknown_field_is_refused_when_the_flags_are_built():
    with pytest.raises(KeyError, match="no field 'latent'"):
        add_flags(argparse.ArgumentParser(), TrainConfig, ("latent",), help={})


@pytest.mark.parametrize("bad", [{"batch_size": 0}, {"proj_steps": -1}, {"n_boot": -5},
                                 {"smooth_sigma": -0.5}, {"val_quantile": 1.0},
                                 {"proj_lr": 0}, {"predictors": "rec_error,nope"},
                                 {"n_samples": True}])
def test_eval_settings_validate_themselves(bad):
    with pytest.raises(ConfigError):
        EvalSettings(**bad)
