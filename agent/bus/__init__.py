"""The message bus: the embedded nats-server, JetStream ingestion, message disposition, key-value snapshots."""
