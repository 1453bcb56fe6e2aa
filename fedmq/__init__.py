"""fedmq fedmq package."""
