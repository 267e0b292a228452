"""The local Ray a sweep starts (no --address) stays on this machine: every port it opens
answers on loopback and refuses connections on the machine's own address."""

import socket

import pytest
import ray

from orchestrator.runner import start_ray

pytestmark = pytest.mark.slow


def machine_address() -> str | None:
    """This machine's outward interface address (a UDP connect sends nothing)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: routing only picks the interface
            address = probe.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") else address


def accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=3):
            return True
    except OSError:
        return False


@pytest.mark.parametrize("address", [None, "local"])
def test_embedded_ray_listens_on_loopback_only(monkeypatch, address):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    outward = machine_address()
    if outward is None:
        pytest.skip("this machine has no non-loopback interface to probe")
    assert not ray.is_initialized()
    assert start_ray(address) is True
    try:
        node = next(n for n in ray.nodes() if n["Alive"])
        gcs_host, gcs_port = ray.get_runtime_context().gcs_address.rsplit(":", 1)
        assert node["NodeManagerAddress"] == gcs_host == "127.0.0.1"
        ports = [int(gcs_port), node["NodeManagerPort"], node["ObjectManagerPort"]]
        assert all(accepts("127.0.0.1", port) for port in ports)
        assert not any(accepts(outward, port) for port in ports), (outward, ports)
        assert start_ray(address) is False  # already up: the caller did not start it
    finally:
        ray.shutdown()


def test_the_loopback_switch_lasts_for_that_start_only():
    if machine_address() is None:
        pytest.skip("on a machine with loopback only, Ray's default is loopback too")
    start_ray(None)
    ray.shutdown()
    ray.init(address="local", include_dashboard=False, configure_logging=False, num_cpus=1)  # Ray's own default
    try:
        assert next(n for n in ray.nodes() if n["Alive"])["NodeManagerAddress"] != "127.0.0.1"
    finally:
        ray.shutdown()
