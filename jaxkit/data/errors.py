"""The data layer's error for bad input: token files, tokenizers and the
arguments of `jaxkit data prepare`. The command line prints it as one line."""


class DataError(ValueError):
    """A token file, tokenizer or data argument that cannot be used."""
