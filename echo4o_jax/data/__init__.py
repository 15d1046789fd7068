"""Training data: the ArrayRecord sample format (`records`), the Grain loader with packing (`pipeline`),
importers (`import_echo4o`, `import_bagel_parquet`), the offline demo dataset (`demo`) and `inspect`.

Importing this package is cheap (numpy / PIL only); Grain and the tokenizer load when a pipeline starts.
"""

from echo4o_jax.data.records import (  # noqa: F401
    FORMAT_VERSION,
    ImageInfo,
    Record,
    RecordError,
    RecordReader,
    RecordWriter,
    decode_record,
    encode_record,
)
