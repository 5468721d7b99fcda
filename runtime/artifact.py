"""An export artifact as the runtime sees it: manifest, verified graph files, tokenizer,
action statistics, sampler sigmas. numpy only."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vpp_edge import precisions
from vpp_edge.normalization import ActionNormalizer, StateNormalizer
from vpp_edge.presets import Preset, preset_from_dict
from vpp_edge.tokenizer import TOKENIZER_FILE, InstructionTokenizer, load_tokenizer

from .manifest import (ArtifactError, TensorSpec, confined, entry_errors, manifest_precisions, read_manifest,
                       verify_entry, verify_file)



@dataclass
class Artifact:
    root: Path
    manifest: dict[str, Any]
    preset: Preset
    normalizer: ActionNormalizer
    state_normalizer: StateNormalizer | None = None  # policies that take the robot state (use_proprio)

    @classmethod
    def open(cls, root: str | Path) -> "Artifact":
        root = Path(root)
        manifest = read_manifest(root)
        preset = preset_from_dict(manifest["preset"], source=str(root / "manifest.json"))
        state = StateNormalizer.from_dict(manifest.get("state_normalization"))
        head = preset.action_head
        if head.use_proprio != (state is not None) or (state is not None and state.dim != head.proprio_dim):
            raise ArtifactError(f"{root}: preset '{preset.name}' {'takes' if head.use_proprio else 'takes no'} a robot "
                                f"state of {head.proprio_dim} values but the manifest's state_normalization has "
                                f"{'none' if state is None else state.dim}")
        return cls(root, manifest, preset, ActionNormalizer.from_dict(manifest.get("normalization")), state)

    @property
    def sigmas(self) -> list[float]:
        return [float(s) for s in self.manifest["sigmas"]]

    @property
    def action_mode(self) -> str:
        return self.manifest.get("action_mode", "sampler")

    def precisions(self) -> list[str]:
        return manifest_precisions(self.manifest)

    def input_spec(self, graph: str, name: str) -> TensorSpec:
        """Shape and dtype of input ``name`` of ``graph`` (the same in every precision: their
        graphs keep the traced graph's inputs and outputs), from the manifest."""
        entry = self.manifest["graphs"].get(f"{precisions.reference()}/{graph}", {})
        for spec in entry.get("inputs", []):
            if spec["name"] == name:
                return TensorSpec.from_dict(spec)
        raise ArtifactError(f"{self.root}: the manifest records no input '{name}' of graph '{graph}'")

    def graph(self, precision: str, name: str) -> tuple[Path, list[TensorSpec], list[TensorSpec]]:
        """A graph's verified file and its IO specs; refuses missing or modified files."""
        key = f"{precision}/{name}"
        entry = self.manifest["graphs"].get(key)
        if entry is None:
            raise ArtifactError(f"{self.root}: no graph '{key}' (precisions here: {', '.join(self.precisions())})")
        errors = entry_errors(key, entry)
        if errors:
            raise ArtifactError(f"{self.root}: manifest graph '{key}': {'; '.join(errors)}")
        path = verify_entry(self.root, key, entry)
        return path, [TensorSpec.from_dict(d) for d in entry["inputs"]], [TensorSpec.from_dict(d) for d in entry["outputs"]]

    def tokenizer(self) -> InstructionTokenizer:
        """The instruction tokenizer: ``text_max_length`` ids (what the text graph takes: 77,
        or 20 in artifacts exported before the goal had its own pass), warning past the
        video condition's ``preset.text.max_length`` tokens."""
        length = int(self.manifest["text_max_length"])
        name = self.manifest.get("tokenizer", TOKENIZER_FILE)
        if "tokenizer_sha256" in self.manifest:  # artifacts written before it was recorded have none
            path = verify_file(self.root, name, self.manifest["tokenizer_sha256"], "tokenizer")
        else:
            path = confined(self.root, name, "tokenizer")
        if path.name != TOKENIZER_FILE:
            raise ArtifactError(f"{self.root}: 'tokenizer' names {name!r}; expected {TOKENIZER_FILE}")
        return load_tokenizer(path.parent, length, min(length, self.preset.text.max_length))
