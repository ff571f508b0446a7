"""A registry of two hosts that do not exist: for tests that must never reach a hypervisor."""

REGISTRY = """
redis_url = "{url}"

[hosts.kvm1]
peer_uri = "qemu+tcp://192.0.2.1/system"
migration_address = "192.0.2.1"

[hosts.kvm2]
peer_uri = "qemu+tcp://192.0.2.2/system"
migration_address = "192.0.2.2"
"""
