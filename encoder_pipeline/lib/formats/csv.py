"""CSV files with a header row (a file, a glob, or a URI), through Daft's reader."""

import daft

from encoder_pipeline.lib.formats.base import DaftTableFormat, register


@register
class CSV(DaftTableFormat):
    key = "csv"
    suffixes = (".csv",)
    reader = staticmethod(daft.read_csv)
