"""Test authors run the tasks eagerly with the `eager_commands` fixture: no broker at all."""

from __future__ import annotations

from celery import Celery

from tasks import posts, tags, users


def test_delay_runs_in_process_and_applies(eager_commands: Celery, clean_database: str) -> None:
    result = users.create.delay(
        data={"username": "eager", "email": "eager@example.com", "password": "password123"}
    )
    assert result.successful()
    assert result.result["outcome"] == "applied"
    post = posts.create.delay(data={"title": "t", "author_id": result.result["id"],
                                    "tags": ["t1"]})
    assert post.result["data"]["tags"] == ["t1"]


def test_an_eager_rejection_is_a_failed_result_naming_the_reason(
    eager_commands: Celery, clean_database: str
) -> None:
    result = tags.update.delay(id=999, data={"name": "x"})
    assert result.failed()
    assert str(result.result).startswith("not_found: ")


def test_an_eager_duplicate_returns_the_first_result(
    eager_commands: Celery, clean_database: str
) -> None:
    first = tags.create.delay(data={"name": "once"}, command_id="k1").result
    second = tags.create.delay(data={"name": "once"}, command_id="k1").result
    assert second == {**first, "outcome": "duplicate"}

