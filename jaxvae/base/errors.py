"""Exception types of jaxvae: every expected failure is one of these, with a message that
names the file (or option) and the problem."""


class JaxvaeError(Exception):
    """Base class: a failure the user can act on (the CLI prints it as one line)."""


class DataError(JaxvaeError):
    """An input volume, mask or dataset folder is missing, unreadable or invalid."""


class RunError(JaxvaeError):
    """A run directory, checkpoint or config is missing, corrupt or incompatible."""


class ConfigError(JaxvaeError):
    """An option has an invalid value (beta < 0, latent_dim 0, unknown predictor...)."""


class OutputError(JaxvaeError):
    """An output cannot be written (exists without overwrite, not writable, escapes its folder)."""
