"""`manage.py generate_candidates`: JSON output with provenance, clear errors, no database.

pytest-django blocks database access in tests not marked django_db, so these tests
also prove the command never touches the database.
"""

from __future__ import annotations

import json
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from modeling.generation.models import BUNDLED_MODELS, DEFAULT_MODEL_ALIAS
from modeling.generation.prompts import opinion_order
from modeling.generation.transformers_backend import TransformersGenerator

from .conftest import OPINIONS, QUESTION


@pytest.fixture
def model_settings(settings, model_store: Path, generator: TransformersGenerator):
    # The same registry key as the session's generator, so the command reuses the loaded model.
    settings.CONCORD_GENERATOR_BACKEND = "transformers"
    settings.CONCORD_GENERATOR_MODEL = DEFAULT_MODEL_ALIAS
    settings.CONCORD_DEVICE = "cpu"
    settings.CONCORD_MODEL_STORE = model_store
    return settings


def _run(*arguments: str) -> str:
    out = StringIO()
    call_command("generate_candidates", *arguments, stdout=out)
    return out.getvalue()


def test_json_output_has_n_candidates_with_provenance(model_settings) -> None:
    arguments = ["--question", QUESTION, "--n", "3", "--seed", "12", "--max-new-tokens", "24", "--json"]
    for opinion in OPINIONS[:4]:
        arguments += ["--opinion", opinion]
    rows = json.loads(_run(*arguments))
    assert len(rows) == 3
    for row in rows:
        assert row["text"] and row["backend"] == "transformers"
        assert row["model"] == row["model_id"] == DEFAULT_MODEL_ALIAS
        assert row["model_revision"] == f"sha256:{BUNDLED_MODELS[DEFAULT_MODEL_ALIAS].sha256}"
        assert row["seed"] == 12 and sorted(row["opinion_order"]) == [0, 1, 2, 3]
        assert row["prompt"] and row["prompt_tokens"] > 0 and 1 <= row["completion_tokens"] <= 24
        assert row["latency_ms"] > 0
    assert rows[0]["opinion_order"] in [opinion_order(12, index, 4) for index in range(6)]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--question", QUESTION, "--n", "2"], "at least one non-empty --opinion"),
        (["--question", QUESTION, "--opinion", "x y z", "--n", "0"], "--n must be at least 1"),
        (["--question", "  ", "--opinion", "x y z"], "--question must not be empty"),
        (["--question", QUESTION, "--opinion", "x y z", "--backend", "tensorflow"], "Unknown backend 'tensorflow'"),
        (["--question", QUESTION, "--opinion", "x y z", "--top-p", "0"], "--top-p"),
    ],
)
def test_bad_input_is_a_command_error(model_settings, arguments: list[str], message: str) -> None:
    with pytest.raises(CommandError, match=message):
        _run(*arguments)


def test_backend_failures_surface_as_command_errors(model_settings) -> None:
    model_settings.CONCORD_OPENAI_BASE_URL = ""
    with pytest.raises(CommandError, match="CONCORD_OPENAI_BASE_URL"):
        _run("--question", QUESTION, "--opinion", "x y z", "--backend", "openai", "--model", "m")
