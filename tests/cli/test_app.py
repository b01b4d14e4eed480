"""Config files for `jaxvae train/evaluate/score`: flags' names as keys, flags override the
file, `--print-config`, a run's config.json as a config, and bad files refused in one line."""

import json

import pytest
import yaml

from jaxvae.cli import main, parse
from jaxvae.data import phantom
from jaxvae.training.config import TrainConfig

SMALL = dict(shape=(64, 64, 40), spacing=(3.5, 3.5, 3.5))


def _write(path, text):
    path.write_text(text)
    return str(path)


def test_yaml_keys_are_the_flags_names_and_flags_override_the_file(tmp_path):
    cfg = _write(tmp_path / "cfg.yaml", "data: phantom\nepochs: 2\nlatent_dim: 32\n"
                 "augmentation:\n  rotation: 0.2\n  scale: [1.0, 1.5]\n"
                 "preprocess:\n  clip: null\n")
    verb, args, _ = parse(["train", "--config", cfg, "--out", str(tmp_path / "r"),
                           "--latent-dim", "16"])
    assert verb == "train" and args.data == "phantom" and args.epochs == 2
    assert args.latent_dim == 16  # the later flag wins over the file
    assert args.augmentation.rotation == 0.2 and tuple(args.augmentation.scale) == (1.0, 1.5)
    assert args.preprocess.clip is None and args.preprocess.drop_fraction == 0.125
    # and a flag before --config is overridden by the file, as in jsonargparse
    _, args, _ = parse(["train", "--epochs", "7", "--config", cfg, "--out", "r"])
    assert args.epochs == 2
    cfg = _write(tmp_path / "e.json", json.dumps({"run": "R", "out": "O", "n_boot": 10,
                                                  "smooth_sigma": 0, "ensemble": False}))
    _, args, _ = parse(["evaluate", "--config", cfg])
    assert (str(args.run), args.n_boot, args.smooth_sigma, args.ensemble) == ("R", 10, 0, False)


def test_print_config_shows_the_resolved_config_which_is_a_valid_config(tmp_path, capsys):
    cfg = _write(tmp_path / "cfg.yaml", "data: phantom\nepochs: 2\n")
    with pytest.raises(SystemExit) as exc:
        main(["train", "--config", cfg, "--out", str(tmp_path / "r"), "--beta", "4",
              "--print-config"])
    assert exc.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["beta"] == 4 and printed["epochs"] == 2 and printed["latent_dim"] == 256
    assert printed["augmentation"]["mirror_prob"] == 0.5 and "crop" in printed["preprocess"]
    assert not (tmp_path / "r").exists()
    again = _write(tmp_path / "printed.yaml", yaml.safe_dump(printed))
    _, args, _ = parse(["train", "--config", again])
    assert args.beta == 4 and str(args.out) == str(tmp_path / "r")


BAD = [  # (file name, content, what the one error line must name)
    ("unknown.yaml", "data: phantom\nlatent_dm: 32\n", "'latent_dm'"),
    ("nested.yaml", "data: phantom\naugmentation:\n  rotaton: 1\n", "'augmentation.rotaton'"),
    ("type.yaml", "data: phantom\nlatent_dim: abc\n", "'latent_dim'"),
    ("range.yaml", "data: phantom\nlatent_dim: 0\n", "'latent_dim'"),
    ("schedule.yaml", "data: phantom\nepochs: 0\nmax_steps: 0\n", "'max_steps'"),
    ("group.yaml", "data: phantom\naugmentation:\n  mirror_prob: 2\n",
     "'augmentation.mirror_prob'"),
    ("list.yaml", "- data\n- phantom\n", "mapping"),
    ("syntax.yaml", "data: [phantom\n", "YAML"),
    ("syntax.json", "{\"data\": \"phantom\",}", "JSON"),
]


@pytest.mark.parametrize("name,text,named", BAD, ids=[b[0] for b in BAD])
def test_bad_config_file_gets_one_line_naming_the_file_and_key(tmp_path, capsys, name, text,
                                                                named):
    cfg = _write(tmp_path / name, text)
    assert main(["train", "--config", cfg, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and cfg in err[0] and named in err[0], err
    assert "Traceback" not in err[0] and not (tmp_path / "r").exists()


def test_missing_config_file_and_missing_required_key(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "nope.yaml"), "--out", "r"]) == 2
    err = capsys.readouterr().err.strip()
    assert "nope.yaml" in err and "cannot read" in err and len(err.splitlines()) == 1
    cfg = _write(tmp_path / "cfg.yaml", "epochs: 2\n")
    assert main(["train", "--config", cfg, "--out", str(tmp_path / "r")]) == 2
    assert "missing --data" in capsys.readouterr().err


def test_train_from_a_yaml_file_then_again_from_the_runs_config_json(tmp_path, capsys):
    phantom.write_brats(tmp_path / "d", n_healthy=5, n_lesion=2, seed=0, modalities=("t2",),
                        **SMALL)
    cfg = _write(tmp_path / "cfg.yaml", yaml.safe_dump(
        {"data": str(tmp_path / "d"), "epochs": 1, "latent_dim": 8, "batch_size": 16,
         "val_fraction": 0.2, "keep_checkpoints": 2, "channels": [8, 16, 16, 32],
         "augmentation": {"rotation": 0.05}, "preprocess": {"clip": 2.0}}))
    run = tmp_path / "R"
    assert main(["train", "--config", cfg, "--out", str(run)]) == 0, capsys.readouterr().err
    first = TrainConfig.from_dict(json.loads((run / "config.json").read_text()))
    assert (first.latent_dim, first.keep_checkpoints, first.channels) == (8, 2, (8, 16, 16, 32))
    assert first.augmentation.rotation == 0.05 and first.data["preprocess"]["clip"] == 2.0
    # the run's own config.json is a valid --config: same data, sequence, split, settings
    _, args, _ = parse(["train", "--config", str(run / "config.json"), "--out", "R2"])
    assert args.data == str(tmp_path / "d") and args.modality == "t2"
    assert args.split == first.data["split"] and args.preprocess.clip == 2.0
    run2 = tmp_path / "R2"
    assert main(["train", "--config", str(run / "config.json"), "--out", str(run2)]) == 0
    second = TrainConfig.from_dict(json.loads((run2 / "config.json").read_text()))
    assert second.to_dict() == first.to_dict()
    assert (run2 / "split.json").read_text() == (run / "split.json").read_text()
