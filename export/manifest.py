"""Where export code and older callers find the artifact manifest's helpers; they are defined
in :mod:`vpp_edge.runtime.manifest` (the runtime validates what it loads)."""

from vpp_edge.runtime.manifest import (FORMAT_NAME, FORMAT_VERSION, MANIFEST_FILE, ArtifactError,  # noqa: F401
                                       TensorSpec, check_engine_fits, confined, manifest_precisions,
                                       read_manifest, sha256_file, tokenizer_entry, verify_entry, verify_file,
                                       write_manifest)
from vpp_edge.runtime.manifest import INT8_PRECISIONS, PRECISIONS, RUNTIME_PRECISIONS  # noqa: F401
