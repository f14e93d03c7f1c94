"""DataTrove's version of bench-data-prep: WARC -> trafilatura -> Gopher repetition, Gopher quality,
C4 and FineWeb quality filters, one task on one worker. Prints what each step kept."""

import importlib.metadata  # noqa: F401  (datatrove 0.10's dependency check needs it imported)
import os
import sys
import tempfile

from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.extractors import Trafilatura
from datatrove.pipeline.filters import (
    C4QualityFilter,
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
)
from datatrove.pipeline.readers import WarcReader


def main() -> None:
    warc = os.path.abspath(sys.argv[1])
    with tempfile.TemporaryDirectory() as logs:
        LocalPipelineExecutor(
            pipeline=[
                WarcReader(os.path.dirname(warc), glob_pattern=os.path.basename(warc)),
                Trafilatura(favour_precision=True),
                GopherRepetitionFilter(),
                GopherQualityFilter(),
                C4QualityFilter(filter_no_terminal_punct=False),  # as FineWeb runs it, and our default
                FineWebQualityFilter(),
            ],
            tasks=1,
            workers=1,
            logging_dir=logs,
        ).run()


if __name__ == "__main__":
    main()
