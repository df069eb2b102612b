"""Word vectors answering as gensim's KeyedVectors (4.x) does, batched on a device.

The parts (docs/word-vectors.md tells the whole story):
- query: gensim's query semantics, queries prepared into what a scan needs;
- scanner: the Scanner protocol; columns_first, rows_first, prefilter, candidates: one scan
  strategy each; factory: which one a model uses, picked once at load time;
- topk: the running top-k every scanner keeps; search_rows: the rows they scan;
- model: WordVectors, which ties them together; analogies: gensim's analogy evaluation.
"""

from .analogies import AnalogyEvaluator, AnalogyReport, AnalogySection, evaluate_analogies
from .bfloat16 import bfloat16_prefilter_available, bfloat16_rows, prefilter_margin, within_margin
from .candidates import CandidateScan
from .columns_first import COSMUL_EPSILON, ColumnsFirstScan
from .factory import SCANNER_NAMES, PrefilterSetting, ScannerName, build_scanner, choose_scanner
from .model import WordVectors
from .prefilter import Bfloat16PrefilterScan
from .query import (
    BoolArray,
    FloatArray,
    IntArray,
    Method,
    PreparedBatch,
    QueryColumns,
    QueryVocabulary,
    RankedLists,
    SimilarityQuery,
    Term,
    prepare,
    query_columns,
)
from .rows_first import RowsFirstScan
from .scanner import BlockKind, ScanLog, Scanner
from .search_rows import SearchRows, unit_rows
from .topk import RunningTopK

__all__ = [
    "COSMUL_EPSILON",
    "SCANNER_NAMES",
    "AnalogyEvaluator",
    "AnalogyReport",
    "AnalogySection",
    "Bfloat16PrefilterScan",
    "BlockKind",
    "BoolArray",
    "CandidateScan",
    "ColumnsFirstScan",
    "FloatArray",
    "IntArray",
    "Method",
    "PrefilterSetting",
    "PreparedBatch",
    "QueryColumns",
    "QueryVocabulary",
    "RankedLists",
    "RowsFirstScan",
    "RunningTopK",
    "ScanLog",
    "Scanner",
    "ScannerName",
    "SearchRows",
    "SimilarityQuery",
    "Term",
    "WordVectors",
    "bfloat16_prefilter_available",
    "bfloat16_rows",
    "build_scanner",
    "choose_scanner",
    "evaluate_analogies",
    "prefilter_margin",
    "prepare",
    "query_columns",
    "unit_rows",
    "within_margin",
]
