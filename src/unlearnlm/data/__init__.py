"""Records, validation, tokenization and the chunk schedule."""

from unlearnlm.data.records import Record, load_records, row_kind

__all__ = ["Record", "load_records", "row_kind"]
