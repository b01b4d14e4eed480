"""The command line: the program (app.py: parser, config files, main), what each verb does
(commands.py), the flags generated from the settings (flags.py) and the demo."""

from jaxvae.cli.app import main, parse

__all__ = ["main", "parse"]
