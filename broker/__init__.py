"""fedmq broker package."""
