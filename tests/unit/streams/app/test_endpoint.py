"""Where a worker says it answers queries (its group metadata's endpoint)."""

from __future__ import annotations

import socket

import pytest
from pydantic import ValidationError

from paysaga.streams.app.settings import Settings


def test_the_endpoint_is_the_advertised_one_or_the_bind_address() -> None:
    assert Settings(web_port=7001).web_endpoint == "127.0.0.1:7001"
    assert Settings(web_port=7001, web_advertised="w1:80").web_endpoint == "w1:80"
    # bound to every interface (the image's 0.0.0.0): the hostname, which peers resolve
    wild = Settings(web_host="0.0.0.0", web_port=7001, web_token="t")
    assert wild.web_endpoint == f"{socket.gethostname()}:7001"


@pytest.mark.parametrize("bad", ["w1", "http://w1:80", "w1:80/x", "u@w1:80", "w1:0"])
def test_an_advertised_endpoint_must_be_host_and_port(bad: str) -> None:
    with pytest.raises(ValidationError, match="expected host:port"):
        Settings(web_advertised=bad)
