import pickle

import pytest

from persia.errors import BackendError, ConfigError, PersiaError, StoreError


def test_config_error_lists_every_problem():
    err = ConfigError(["slot 'a': dim must be > 0, got 0", "unknown key 'foo'"], source="x.yml")
    text = str(err)
    assert "2 problems" in text and "dim must be > 0, got 0" in text and "unknown key 'foo'" in text
    assert "x.yml" in text


@pytest.mark.parametrize(
    "err",
    [
        ConfigError(["a", "b"], source="s"),
        BackendError("died", role="parameter-server", rank=1),
        StoreError("bad dtype"),
    ],
)
def test_errors_survive_pickling(err):
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is type(err)
    assert str(back) == str(err)
    assert isinstance(back, PersiaError)


def test_backend_error_names_role_and_rank():
    err = BackendError("no reply within 30 s", role="parameter-server", rank=1)
    assert str(err).startswith("parameter-server[1]: ")
    assert err.role == "parameter-server" and err.rank == 1
