"""Where a model or a data set comes from: a local path, or a Hugging Face Hub id.

A Hub id is ``ORG/NAME`` with an optional ``@REVISION`` (branch, tag or commit). It is resolved with
``huggingface_hub.snapshot_download``, which with ``HF_HUB_OFFLINE=1`` reads only the local cache
(``$HF_HOME/hub/models--ORG--NAME/refs/<revision>`` names the commit, ``snapshots/<commit>/`` holds
the files). Only configs, tokenizer files and safetensors are fetched: pickled checkpoints are never
downloaded, let alone loaded.

Resolution reads no weights, so every command resolves its models before the first one loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from unlearnlm.errors import UserError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TOKENIZER_FILES = ["*.json", "*.model", "*.txt", "*.tiktoken", "*.jinja"]
MODEL_FILES = [*TOKENIZER_FILES, "*.safetensors"]
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_offline() -> bool:
    """The user's ``HF_HUB_OFFLINE``, read now (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def split_hub_spec(spec: str) -> tuple[str, str | None] | None:
    """``ORG/NAME[@REVISION]`` -> ``(repo_id, revision)``; None when ``spec`` is not shaped like an id."""
    repo_id, _, revision = spec.partition("@")
    if not _HUB_ID.fullmatch(repo_id) or (revision == "" and "@" in spec):
        return None
    return repo_id, revision or None


def snapshot(repo_id: str, revision: str | None, repo_type: str, patterns: list[str] | None = None) -> tuple[Path, str]:
    """``(snapshot directory, commit)`` of a Hub repository; from the cache alone when offline."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    shown = repo_id + (f"@{revision}" if revision else "")
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, repo_type=repo_type, allow_patterns=patterns,
                                        local_files_only=is_offline()))
    except LocalEntryNotFoundError:
        where = "in the local Hugging Face cache" + (" (HF_HUB_OFFLINE is set)" if is_offline() else "")
        command = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "") \
            + (" --repo-type dataset" if repo_type == "dataset" else "")
        raise UserError(f"{repo_type} {shown}: not found {where}; download it first ({command})") from None
    except (HfHubHTTPError, OSError, ValueError) as err:
        raise UserError(f"{repo_type} {shown}: cannot resolve it on the Hub ({str(err).splitlines()[0]})") from None
    # The cache keeps each commit's files under snapshots/<commit>: its name is the resolved commit.
    return folder, folder.name


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: the directory to read, where it came from, and (for an adapter) its base."""

    spec: str
    path: Path
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None
    tokenizer: ModelSource | None = None  # a tokenizer kept elsewhere (``--tokenizer``)
    base: ModelSource | None = None  # set for a LoRA adapter directory

    @property
    def is_adapter(self) -> bool:
        return self.base is not None

    @property
    def config_dir(self) -> Path:
        """The directory with the architecture's ``config.json`` (an adapter's is its base's)."""
        return self.base.config_dir if self.base else self.path

    @property
    def tokenizer_dir(self) -> Path:
        if self.tokenizer is not None:
            return self.tokenizer.path
        if self.base is not None and not (self.path / "tokenizer_config.json").is_file():
            return self.base.tokenizer_dir
        return self.path

    @property
    def name(self) -> str:
        return self.repo_id.split("/")[-1] if self.repo_id else self.path.resolve().name or "model"

    @property
    def reference(self) -> str:
        """How another machine or folder finds this model again: ``ORG/NAME`` or an absolute path."""
        return self.repo_id or str(self.path.resolve())

    @cached_property
    def weights_sha256(self) -> dict[str, str]:
        return weights_sha256(self.path)

    def _origin(self) -> dict:
        return {"spec": self.spec, "path": str(self.path.resolve()), "repo_id": self.repo_id,
                "revision": self.revision, "commit": self.commit}

    def record(self) -> dict:
        """What ``run.json`` and ``evaluation_results.json`` keep about the model read."""
        record = {**self._origin(), "weights_sha256": self.weights_sha256}
        if self.tokenizer is not None:
            record["tokenizer"] = self.tokenizer._origin()
        if self.base is not None:
            record["base"] = self.base.record()
        return record


def weights_sha256(directory: str | Path) -> dict[str, str]:
    """sha256 of every safetensors file in ``directory``, by file name."""
    digests = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        digest = hashlib.sha256()
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
        digests[file.name] = digest.hexdigest()
    return digests


def resolve_model(spec: str | Path | ModelSource, tokenizer: str | Path | ModelSource | None = None) -> ModelSource:
    """A model directory, an adapter directory or a Hub id, checked without loading any weights."""
    if isinstance(spec, ModelSource):
        source = spec
    else:
        source = _locate(str(spec))
        _check_model_files(source)
        if (source.path / ADAPTER_CONFIG).is_file():
            source = _with_base(source)
    if tokenizer is not None:
        tokenizer_source = tokenizer if isinstance(tokenizer, ModelSource) else _locate(str(tokenizer), TOKENIZER_FILES)
        if not (tokenizer_source.path / "tokenizer_config.json").is_file():
            raise UserError(f"{tokenizer_source.spec}: no tokenizer_config.json, so not a tokenizer")
        source = replace(source, tokenizer=tokenizer_source)
    return source


def _locate(spec: str, patterns: list[str] = MODEL_FILES) -> ModelSource:
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{spec}: not a model directory")
        return ModelSource(spec, path)
    hub = split_hub_spec(spec)
    if hub is None:
        raise UserError(f"{spec}: no such model directory")
    try:
        folder, commit = snapshot(*hub, repo_type="model", patterns=patterns)
    except UserError as err:
        # ORG/NAME is also how a relative path looks: say that no such directory exists either.
        raise UserError(f"{err} (and there is no directory {spec})") from None
    return ModelSource(spec, folder, hub[0], hub[1], commit)


def _check_model_files(source: ModelSource) -> None:
    path, spec = source.path, source.spec
    if (path / ADAPTER_CONFIG).is_file():
        if not (path / ADAPTER_WEIGHTS).is_file():
            raise UserError(f"{spec}: an adapter without {ADAPTER_WEIGHTS} (pickle checkpoints are not loaded)")
        return
    if not (path / "config.json").is_file():
        raise UserError(f"{spec}: not a Hugging Face model directory (no config.json)")
    _check_architecture(spec, path / "config.json")
    if not any(path.glob("*.safetensors")):
        raise UserError(f"{spec}: no .safetensors weights (pickle checkpoints are not loaded)")
    for file in sorted(path.glob("*.safetensors")):
        _check_safetensors(spec, file)


def _check_architecture(spec: str, config_file: Path) -> None:
    """A readable ``config.json`` of an architecture transformers itself implements: a model whose
    code ships with its weights (``auto_map``) would need remote code, which unlearnlm never runs."""
    try:
        settings = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{spec}/config.json: unreadable ({str(err).splitlines()[0]})") from None
    if not isinstance(settings, dict):
        raise UserError(f"{spec}/config.json: not a JSON object")
    if not settings.get("auto_map"):
        return  # an unknown model_type is then transformers' own error, when the model loads
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES  # imports torch: only here

    if settings.get("model_type") not in CONFIG_MAPPING_NAMES:
        raise UserError(f"{spec}: its architecture ({settings.get('model_type')!r}) needs the model's own "
                        "remote code, which unlearnlm never runs (trust_remote_code is always off)")


def _check_safetensors(spec: str, file: Path) -> None:
    """The header of a safetensors file, read without its tensors: a truncated or damaged file fails here."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="numpy") as weights:
            weights.keys()
    except (SafetensorError, OSError) as err:
        raise UserError(f"{spec}/{file.name}: damaged safetensors file ({str(err).splitlines()[0]})") from None


def _with_base(adapter: ModelSource) -> ModelSource:
    """An adapter with its base model resolved: an absolute path, or a Hub id at the recorded revision."""
    try:
        settings = json.loads((adapter.path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{adapter.spec}/{ADAPTER_CONFIG}: unreadable ({err})") from None
    base = settings.get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise UserError(f"{adapter.spec}/{ADAPTER_CONFIG}: no base_model_name_or_path")
    revision = settings.get("revision")
    if revision and split_hub_spec(base) and not Path(base).exists():
        base = f"{base}@{revision}"
    base_source = resolve_model(base)
    if base_source.is_adapter:
        raise UserError(f"{adapter.spec}: its base {base} is itself an adapter")
    return replace(adapter, base=base_source)


def pin_adapter_base(adapter_dir: Path, base: ModelSource) -> None:
    """Make a saved adapter name its base so that it loads from any folder: the absolute path of a
    local base, or the Hub id with the commit it was trained from. Written after peft saved it, since
    peft looks the base up while saving (on the network, for an id)."""
    config_path = adapter_dir / ADAPTER_CONFIG
    settings = json.loads(config_path.read_text(encoding="utf-8"))
    settings.update(base_model_name_or_path=base.reference, revision=base.commit)
    config_path.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n", encoding="utf-8")


@dataclass(frozen=True)
class LoadedModel:
    """A model and tokenizer the Python API was given already loaded: trained in place, never re-read."""

    model: Any
    tokenizer: Any

    @property
    def spec(self) -> str:
        return getattr(self.model, "name_or_path", "") or "<model given in memory>"

    @property
    def name(self) -> str:
        return Path(self.spec).name or "model"

    def record(self) -> dict:
        # Its weights may differ from any file (the caller may have changed them): no file hash applies.
        return {"spec": self.spec, "in_memory": True, "weights_sha256": None}
