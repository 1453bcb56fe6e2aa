"""fedmq worker package."""
