"""fedmq aggregator package."""
