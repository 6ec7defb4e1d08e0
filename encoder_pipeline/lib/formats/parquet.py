"""Parquet files (a file, a glob, or a URI), through Daft's reader."""

import daft

from encoder_pipeline.lib.formats.base import DaftTableFormat, register


@register
class Parquet(DaftTableFormat):
    key = "parquet"
    suffixes = (".parquet",)
    reader = staticmethod(daft.read_parquet)
