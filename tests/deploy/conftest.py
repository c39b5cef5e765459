from tests.server.conftest import engine_reference, reference, same_audio  # noqa: F401 - fixtures shared
