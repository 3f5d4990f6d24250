"""The one error class of checkpoint conversion."""


class ConversionError(ValueError):
    """A checkpoint, config or tokenizer that cannot be converted: an
    architecture or feature jaxkit does not compute, a missing file, or
    weights that do not fit their config. The message names the value."""
