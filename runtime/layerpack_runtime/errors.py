"""Exception types. Every error a user can cause derives from LayerpackError, whose message is
one complete line meant for the terminal (the CLI prints it as is)."""


class LayerpackError(Exception):
    """A problem the user can act on; str(e) is a one-line explanation."""


class FormatError(LayerpackError):
    """A file is not what the layerpack / safetensors format says it must be."""


class VersionError(FormatError):
    """A pack was written by a newer, incompatible major format version."""
