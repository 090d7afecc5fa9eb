"""[notifications]: a configuration that loads keeps its subscriptions alive, and each mistake names its key."""

from pathlib import Path

import pytest

from graphsync.config import load_settings
from tests.test_config import MINIMAL, config_error, write, write_secret


def _load(tmp_path: Path, section: str) -> Path:
    write_secret(tmp_path)
    return write(tmp_path, MINIMAL + "[notifications]\n" + section)


def test_notifications_are_off_unless_configured(tmp_path: Path) -> None:
    write_secret(tmp_path)
    assert load_settings(write(tmp_path, MINIMAL), {}).notifications is None


def test_the_lifecycle_url_defaults_beside_the_notification_url(tmp_path: Path) -> None:
    path = _load(tmp_path, 'notification_url = "https://graphsync.example.com/graph/"\n')

    notifications = load_settings(path, {}).notifications

    assert notifications is not None
    assert notifications.notification_url == "https://graphsync.example.com/graph"
    assert notifications.lifecycle == "https://graphsync.example.com/graph/lifecycle"
    assert (notifications.port, notifications.lifetime_seconds) == (8090, 29 * 86400)


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ('notification_url = "http://graphsync.example.com/n"\n', "notifications.notification_url (from"),
        ('notification_url = "https://graphsync.example.com/n?code=1"\n', "without query"),
        ('notification_url = "https://x.example.com/n"\nlifetime = "30d"\n', "notifications.lifetime (from"),
        ('notification_url = "https://x.example.com/n"\nrenew_before = "29d"\n', "notifications.renew_before"),
        ('notification_url = "https://x.example.com/n"\ncheck_every = "2d"\n', "notifications.check_every"),
        ("port = 8090\n", "notifications.notification_url"),
    ],
)
def test_a_notification_setting_that_graph_would_refuse_names_its_key(
    tmp_path: Path, lines: str, expected: str
) -> None:
    assert expected in config_error(_load(tmp_path, lines))


def test_plain_http_is_allowed_on_loopback_only(tmp_path: Path) -> None:
    path = _load(tmp_path, 'notification_url = "http://127.0.0.1:8090/n"\n')
    notifications = load_settings(path, {}).notifications
    assert notifications is not None and notifications.notification_url == "http://127.0.0.1:8090/n"


def test_an_environment_variable_sets_one_notification_key(tmp_path: Path) -> None:
    """How each replica of a fleet gets its own port: the section is optional, and still nests."""
    path = _load(tmp_path, 'notification_url = "https://graphsync.example.com/n"\n')

    notifications = load_settings(path, {"GRAPHSYNC_NOTIFICATIONS__PORT": "9001"}).notifications

    assert notifications is not None and notifications.port == 9001
