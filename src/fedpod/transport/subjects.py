"""Subject names: namespaced and versioned, so that fedpod can share a NATS cluster.

A party subscribes to its own inbox; pods also listen for discovery requests and publish
heartbeats. Fingerprints contain only [A-Z2-7-], which are valid subject tokens.
"""

PREFIX = "fedpod.v1"
DISCOVER = f"{PREFIX}.discover"


def inbox(fingerprint: str) -> str:
    return f"{PREFIX}.inbox.{fingerprint}"


def heartbeat(fingerprint: str) -> str:
    return f"{PREFIX}.heartbeat.{fingerprint}"


HEARTBEATS = f"{PREFIX}.heartbeat.*"
INBOXES = f"{PREFIX}.inbox.*"


def replies(fingerprint: str) -> str:
    """The prefix of a party's request/reply subjects (nats-py's `inbox_prefix`): a broker
    that fedpod configures lets each party subscribe to its own replies only."""
    return f"{PREFIX}.reply.{fingerprint}"


ALL_REPLIES = f"{PREFIX}.reply.>"


def cast(sender: str, transfer: str) -> str:
    """Where `sender` publishes the chunks of one transfer to several parties at once (the
    round's global model): each recipient subscribes to it only for that transfer, which it was
    sent a signed ticket for."""
    return f"{PREFIX}.cast.{sender}.{transfer}"


CASTS = f"{PREFIX}.cast.*.*"
