"""Model cards on every saved model, --redact, and publishing with only the Hub calls replaced."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from conftest import REPO, run_cli, unlearn_args


def card_of(directory: Path) -> tuple[dict, str]:
    text = (directory / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


def test_the_card_names_base_method_settings_and_hashes_never_the_data(hub_cache, micro_data_dir, lume_rows, tmp_path):
    out = tmp_path / "unlearned"
    assert run_cli(*unlearn_args(REPO, micro_data_dir, out), "--method", "npo") == 0
    run = json.loads((out / "run.json").read_text())
    meta, body = card_of(out)
    assert meta["base_model"] == REPO and "npo" in meta["tags"] and meta["library_name"] == "transformers"
    assert run["model_source"]["commit"] in body
    assert run["data"]["forget_sha256"] in body and run["data"]["retain_sha256"] in body
    assert run["output_weights_sha256"]["model.safetensors"] in body
    assert str(micro_data_dir / "forget.jsonl") in body
    assert "method: npo" in body and "max_steps: 1" in body  # the settings block
    for row in lume_rows["forget"] + lume_rows["retain"]:
        assert row["output"] not in body and row["input"] not in body


def test_redact_keeps_paths_out_and_pushing_uploads_the_saved_directory(micro_model_dir, micro_data_dir, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **options: calls.append(("create", repo_id, options)))

    def upload_folder(self, *, folder_path, repo_id, **options):
        calls.append(("upload", repo_id, sorted(path.name for path in Path(folder_path).iterdir()), options))
        return "https://huggingface.co/me/forgot/commit/0"

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    out = tmp_path / "unlearned"
    assert run_cli(*unlearn_args(str(micro_model_dir), micro_data_dir, out), "--redact",
                   "--push-to-hub", "me/forgot", "--private") == 0
    _, body = card_of(out)
    assert str(micro_data_dir) not in body and str(micro_model_dir) not in body
    assert json.loads((out / "run.json").read_text())["data"]["forget_sha256"] in body
    create, upload = calls
    assert create == ("create", "me/forgot", {"private": True, "exist_ok": True})
    assert upload[1] == "me/forgot" and {"README.md", "model.safetensors", "run.json", "config.json"} <= set(upload[2])


def test_a_bad_push_target_fails_before_training(micro_model_dir, micro_data_dir, tmp_path, capsys):
    code = run_cli(*unlearn_args(str(micro_model_dir), micro_data_dir, tmp_path / "out"), "--push-to-hub", "not-an-id")
    assert code == 2 and "expected a repository id ORG/NAME" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
