"""The model card every saved model gets, and publishing the model to the Hub.

The card says where the model came from (base model, commit, weight hashes), how it was unlearned
(method and every setting) and on what (the data's sha256 and row counts: never a row of it), and
its validation scores when the run measured them. With ``redact`` the data's file names and the
model paths are left out too, in case they name whose data it was; the hashes stay, so the data
can still be matched against the card by whoever holds it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import yaml

from unlearnlm.errors import UserError
from unlearnlm.hub import split_hub_spec

CARD_FILE = "README.md"
REDACTED = "[redacted]"
# What a published model directory holds besides its files: never the resume state.
NOT_PUBLISHED = ["state/*", "state.*/*", "best/*", "origin/*"]


def _base_line(source: Mapping, redact: bool) -> str:
    if source.get("repo_id"):
        return f"[{source['repo_id']}](https://huggingface.co/{source['repo_id']}) at commit `{source['commit']}`"
    if source.get("in_memory"):
        return "a model given to the Python API in memory" + ("" if redact else f" (`{source['spec']}`)")
    return "a local model" + ("" if redact else f" (`{source['path']}`)")


def _front_matter(report: Mapping) -> str:
    source = report["model_source"]
    base_id = source.get("repo_id") or (source.get("base") or {}).get("repo_id")
    meta = {"library_name": "peft" if report["config"]["save"] == "adapter" else "transformers",
            "tags": ["unlearnlm", "machine-unlearning", report["config"]["method"]]}
    if base_id:
        meta["base_model"] = base_id
    return "---\n" + yaml.safe_dump(meta, sort_keys=True) + "---\n"


def model_card(report: Mapping, redact: bool = False) -> str:
    """The card's markdown, from a run's ``run.json`` contents."""
    config, data, source = report["config"], report["data"], report["model_source"]
    lines = [_front_matter(report), f"# Unlearned with unlearnlm ({config['method']})", "",
             f"- Base model: {_base_line(source, redact)}"]
    for name, digest in (source.get("weights_sha256") or {}).items():
        lines.append(f"- Base weights: `{name}` sha256 `{digest}`")
    for name, digest in (report.get("output_weights_sha256") or {}).items():
        lines.append(f"- Weights written: `{name}` sha256 `{digest}`")
    kind = "raw documents" if data.get("raw_documents") else "SemEval-format rows"
    for split in ("forget", "retain"):
        where = "" if redact else f" from `{data[split]}`"
        lines.append(f"- {split.capitalize()} set: {data[f'{split}_rows']} {kind}{where}, sha256 `{data[f'{split}_sha256']}`")
    lines += [f"- Steps: {report['steps']} ({report['stopped_reason']}), seed {report['seed']}",
              f"- Library versions: {', '.join(f'{name} {version}' for name, version in report['versions'].items())}", ""]
    verdict = report.get("verdict")
    if verdict:
        lines += ["## Verdict of the held-out check (--config auto)", "", verdict["summary"] + ".", "",
                  *(f"- To try: {tip}" for tip in verdict.get("advice", [])), ""]
    best = report.get("best")
    if best:
        scores = {name: value for name, value in best.items() if isinstance(value, float)}
        lines += ["## Validation scores (the state kept)", "",
                  "| score | value |", "| --- | ---: |", *(f"| {name} | {value:.4f} |" for name, value in scores.items()), ""]
    lines += ["## Settings", "", "```yaml", yaml.safe_dump(_redacted(config) if redact else config, sort_keys=True).rstrip(),
              "```", "", "The data itself is not part of this card or of the model directory.", ""]
    return "\n".join(lines)


def _redacted(config: Mapping) -> dict:
    """The settings without the validation sets' paths."""
    validation = {name: (REDACTED if name in ("forget", "retain", "members", "nonmembers", "general") and value else value)
                  for name, value in config["validation"].items()}
    return {**config, "validation": validation}


def write_model_card(directory: Path, report: Mapping, redact: bool = False) -> None:
    (directory / CARD_FILE).write_text(model_card(report, redact), encoding="utf-8")


def check_push_target(repo_id: str) -> None:
    """A repository to publish to is ``ORG/NAME``, checked before anything trains."""
    if split_hub_spec(repo_id) is None or "@" in repo_id:
        raise UserError(f"--push-to-hub {repo_id!r}: expected a repository id ORG/NAME")


def publish(directory: Path, repo_id: str, private: bool = False) -> str:
    """Create the repository if needed and upload the model directory; returns the commit URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=directory, repo_id=repo_id, ignore_patterns=NOT_PUBLISHED,
                                   commit_message="Upload a model unlearned with unlearnlm")
    except (HfHubHTTPError, OSError) as err:
        raise UserError(f"--push-to-hub {repo_id}: {str(err).splitlines()[0]} (the model is saved in {directory})") from None
    return str(getattr(commit, "commit_url", commit))
