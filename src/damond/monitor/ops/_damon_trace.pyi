"""Types of the C module _damon_trace.c (damon_trace.py's parse_pages in one call)."""

def parse(
    pages: list[bytes], event_id: int, type_len: int, data_offset: int, /
) -> tuple[bytearray, bytearray, int, bool]: ...
