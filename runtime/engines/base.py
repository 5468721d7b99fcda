"""One small interface over the three backends that run an artifact's graphs."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from vpp_edge.graph_spec import GRAPH_NAMES

from ..artifact import Artifact


class Engine(ABC):
    """Runs graphs by name on numpy feeds. Buffers are set up in :meth:`load`, once."""

    backend: str = ""

    def __init__(self, artifact: Artifact, precision: str, graphs: tuple[str, ...] = GRAPH_NAMES):
        self.artifact = artifact
        self.precision = precision
        self.graphs = graphs

    @abstractmethod
    def load(self) -> "Engine":
        """Open every graph, verify it, and allocate its IO."""

    @abstractmethod
    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs of ``graph`` by name (arrays are valid until the next call of that graph)."""

    def close(self) -> None:
        """Release sessions and buffers."""

    def __enter__(self) -> "Engine":
        return self.load()

    def __exit__(self, *exc: object) -> None:
        self.close()
