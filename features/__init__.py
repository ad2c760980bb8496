"""What a feature is (definitions, windows, encoders) and where its state lives.

The stream worker (per event, incremental) and the offline job (vectorised over a whole
data set) both compute features from the definitions in this package; a test proves the
two paths give the same numbers.
"""

from features.definitions import (
    DENSE_COLUMNS,
    EMBEDDINGS,
    FEATURE_NAMES,
    FEATURE_SPEC_VERSION,
    EmbeddingColumn,
)
from features.windows import COMBOS, ComboSpec

__all__ = [
    "COMBOS",
    "DENSE_COLUMNS",
    "EMBEDDINGS",
    "FEATURE_NAMES",
    "FEATURE_SPEC_VERSION",
    "ComboSpec",
    "EmbeddingColumn",
]
