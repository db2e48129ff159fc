"""The broker (an embedded or external NATS server) and the one module that talks to it."""
