"""The error every conversion raises for bad input, so the command line can print it plainly."""


class ConversionError(ValueError):
    """Bad input to export or import: a missing or partial checkpoint, a checkpoint that is
    not ASA, a config the other side cannot express, or an output folder in the way. The
    message names the path or field."""
